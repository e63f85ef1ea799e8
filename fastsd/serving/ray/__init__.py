"""fastsd on Ray Serve: the scale-out runtime (docs/ray.md). `fastsd.serving.ray:build_app` is the
application builder `serve run`, `serve build` and `serve.run(build_app({...}))` take."""
from .app import build_app

__all__ = ["build_app"]
