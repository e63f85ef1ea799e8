"""The parts of `fastsd.accelerate(pipe)` (the drop-in for diffusers pipelines; fastsd/accelerate.py is its
front door): `watch` looks at a user's module as it is now (hooks, attention processors, settings, weights),
`compute` keeps the compute copy fastsd runs in its place and in sync with it, `calls` routes each call of a
wrapped module to a backend's runner, the compute copy or the user's own module."""
