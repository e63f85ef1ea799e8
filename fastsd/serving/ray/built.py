"""fastsd's Ray Serve application as a module attribute, for `serve build` (which takes an Application, not a
builder): `app` is build_app's application for the JSON mapping in $FASTSD_RAY_ARGS (build_app's args).

    FASTSD_RAY_ARGS='{"model": "sd-1.5", "num_replicas": 2}' serve build fastsd.serving.ray.built:app -o fastsd.yaml

The YAML names this module; `serve deploy` imports it again on the cluster, so the application's
runtime_env in the YAML must carry the same FASTSD_RAY_ARGS (docs/ray.md shows the line to add)."""
import json
import os

from ...errors import InvalidParameter
from .app import build_app

ENV = "FASTSD_RAY_ARGS"


def args_from_env() -> dict:
    text = os.environ.get(ENV)
    if not text:
        raise InvalidParameter(ENV, text, 'a JSON object of build_app args, e.g. {"model": "sd-1.5"}')
    try:
        args = json.loads(text)
    except ValueError:
        raise InvalidParameter(ENV, text, 'a JSON object of build_app args, e.g. {"model": "sd-1.5"}') from None
    return args


app = build_app(args_from_env())
