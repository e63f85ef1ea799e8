"""Runs the page until it is stopped: from `fastsd ui`, or as a child of a deployment's supervisor
(`fastsd serve --ui-port P`), which starts `python -m fastsd.ui DEPLOYMENT_DIR`."""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path

from ..errors import FastSDError
from ..serving.processes import TOKEN_ENV, graceful_signals, watch_parent
from ..serving.spec import DeploymentSpec


def require_gradio() -> None:
    if importlib.util.find_spec("gradio") is None:
        raise FastSDError("the web page needs Gradio, which is not installed: pip install 'fastsd[ui]' "
                          "(with -c constraints.txt for the tested version)")


def serve_forever(name: str, host: str, port: int, token: str | None, concurrency: int | None = None) -> int:
    from .app import launch  # torch (fastsd.lora, for the LoRA names): `fastsd --help` does without it
    done = threading.Event()
    demo, _ = launch(name, host, port, token, concurrency, block=False)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"page for deployment '{name}': http://{shown}:{port}/" + ("  (asks for the token)" if token else ""),
          flush=True)
    graceful_signals(done.set)
    watch_parent(done.set)
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    demo.close()
    return 0


def main(argv=None) -> int:
    import logging
    argv = sys.argv[1:] if argv is None else argv
    ddir = Path(argv[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s ui %(levelname)s %(message)s")
    spec = DeploymentSpec.read(ddir)
    os.environ["MII_CACHE_PATH"] = str(ddir.parent)
    code = serve_forever(spec.name, spec.host, spec.ui_port, os.environ.get(TOKEN_ENV) or None)
    logging.shutdown()
    os._exit(code)  # gradio's server threads would otherwise hold the exit up


if __name__ == "__main__":
    sys.exit(main())
