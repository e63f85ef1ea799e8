"""`fastsd ui --deployment NAME`: the web page over a running deployment (needs the `ui` extra: Gradio)."""
from __future__ import annotations

import os

from ..serving.processes import TOKEN_ENV
from .server import require_gradio, serve_forever


def register(subparsers, parents) -> None:
    u = subparsers.add_parser(
        "ui", help="a web page (Gradio) over a running deployment",
        description="Serve a web page (Gradio) that sends its requests to a running deployment through MII's "
                    "client. Its generate action is also the API endpoint /generate (gradio_client). Binds "
                    "127.0.0.1 by default; another address needs a token, which the page then asks for. "
                    "Needs the ui extra: pip install 'fastsd[ui]'.")
    u.add_argument("--deployment", "-d", required=True, help="name of a running deployment (`fastsd serve`)")
    u.add_argument("--port", type=int, default=7860, help="port of the page (default 7860)")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    u.add_argument("--token", help=f"password the page asks for (default: ${TOKEN_ENV} if set)")
    u.add_argument("--concurrency", type=int,
                   help="requests in flight to the deployment (default: its replicas x its --max-batch, or its "
                        "--max-batch-limit with auto); more wait in the page's queue")
    u.set_defaults(func=cmd_ui)


def cmd_ui(args) -> int:
    require_gradio()
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return serve_forever(args.deployment, args.host, args.port, token, args.concurrency)
