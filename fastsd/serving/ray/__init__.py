"""fastsd on Ray Serve: the scale-out runtime (docs/ray.md). `fastsd.serving.ray:build_app` is the
application builder `serve run`, `serve build` and `serve.run(build_app({...}))` take."""


def build_app(args: dict):
    """Ray Serve's application builder (app.py). Imported when called, so a process that only unpickles the
    ingress (which imports this package first) loads no torch: the engine module stays out of it."""
    from .app import build_app as build  # lazy: the engine module (torch), which the ingress does without
    return build(args)


__all__ = ["build_app"]
