"""`fastsd serve | query | status | stop`: serving through a persistent DeepSpeed-MII deployment.
MII is imported only by the commands that need it, so `fastsd --help` stays light."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os

from ..errors import InvalidParameter
from ..images import encode_png
from ..options import image_options, lora_refs, optimize_config, output_paths, read_images
from ..presets import check_config
from ..tiny_vae import load_tiny_vae
from .client import DeploymentClient
from .deploy import serve, stop
from .errors import DeploymentError, ServingError, plain_message
from .folders import cache_path
from .ports import DEFAULT_PORT
from .processes import TOKEN_ENV
from .records import IMAGE_TASK, record_name
from .request import Limits
from .status import format_status, list_deployments, status


def _gpus(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1; got {text!r}") from None
    if not out or any(g < 0 for g in out):
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1; got {text!r}")
    return out


def _max_batch(text: str):
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected auto or a number of images in 1..64; got {text!r}")
    return n


def _resources(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = -1.0
    if not 0 <= x <= 1024:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, e.g. 1 or 0.5; got {text!r}")
    return x


def register(subparsers, parents) -> None:
    model_opts, gen_opts = parents
    s = subparsers.add_parser(
        "serve", parents=[model_opts], help="start a persistent DeepSpeed-MII deployment of the engine",
        description="Start a persistent DeepSpeed-MII deployment (MII's gRPC model servers, one fastsd engine "
                    "each, behind a health-aware load balancer, with a supervisor that restarts what dies). "
                    "Returns once the deployment answers; it keeps running until `fastsd stop NAME`. Clients: "
                    "mii.legacy.mii_query_handle(NAME) with the same MII_CACHE_PATH.")
    s.add_argument("--deployment", "-d", required=True, help="deployment name (MII's deployment_name)")
    s.add_argument("--replicas", type=int, default=1, help="model servers, one engine each (default 1)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"load balancer port; replica i takes port+1+i, as in MII (default {DEFAULT_PORT})")
    s.add_argument("--rest-port", type=int,
                   help="also serve POST /score, GET /health, /ready and /metrics (Prometheus) on this port")
    s.add_argument("--metrics-port", type=int, help="serve GET /metrics (Prometheus) on this port (e.g. without REST)")
    s.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="the processes' logs: text lines, or one JSON object per line (default text)")
    s.add_argument("--ui-port", type=int, help="also serve the web page (fastsd ui; the ui extra) on this port")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); with --token, gRPC calls from other hosts must carry it")
    s.add_argument("--token", help=f"bearer token the REST gateway requires, and gRPC off loopback (default: "
                                   f"${TOKEN_ENV} if set)")
    s.add_argument("--gpus", type=_gpus, help="GPU indices, e.g. 0,1: replica i runs on GPU gpus[i mod n] "
                   "(CUDA_VISIBLE_DEVICES per replica; implies --device cuda)")
    s.add_argument("--hostfile", help="MII/DeepSpeed hostfile ('HOST slots=N' lines) placing replicas on hosts; "
                   "replicas on other hosts are started over ssh")
    s.add_argument("--ssh-config", help="ssh config file (ssh -F) for starting replicas on other hosts")
    s.add_argument("--max-batch", type=_max_batch, default="auto",
                   help="images per engine call: auto (default) measures images/s at 1, 2, 4, ... images per call "
                        "for each size, steps range and task, and batches only as far as that pays; a number forces "
                        "it (1 = no batching)")
    s.add_argument("--max-batch-limit", type=int, default=8, help="largest batch auto tries (default 8)")
    s.add_argument("--batch-min-gain", type=float, default=0.10,
                   help="auto doubles the batch only while images/s rise by this fraction (default 0.10)")
    s.add_argument("--batch-probe-steps", type=int, default=2,
                   help="steps of the start-up measurement at the native size (default 2; other sizes and "
                        "steps ranges are measured on live requests)")
    s.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="how long a request waits for others to share its batch (default 20)")
    s.add_argument("--max-prompts", type=int, default=8, help="prompts per request (default 8)")
    s.add_argument("--max-images", type=int, default=16, help="images per request (default 16)")
    s.add_argument("--max-pixels", type=int, default=1024 * 1024, help="height x width (default 1048576)")
    s.add_argument("--max-steps", type=int, default=150, help="denoising steps (default 150)")
    s.add_argument("--max-image-bytes", type=int, default=8 << 20,
                   help="encoded image and mask bytes per request, image-to-image and inpainting (default 8 MiB); "
                        "decoded images are held to --max-pixels, checked from the header before decoding")
    s.add_argument("--image-url-allow", action="append", default=[], metavar="PREFIX",
                   help="REST image cells may be http(s) URLs starting with PREFIX (repeatable), e.g. "
                        "https://images.example.com/: scheme, host and port must match exactly, the path start "
                        "with PREFIX's; the REST gateway fetches them (no redirects, at most --max-image-bytes, "
                        "--image-url-timeout). Any other URL is refused (HTTP 422). Needs --rest-port")
    s.add_argument("--image-url-timeout", type=float, default=10.0,
                   help="seconds to fetch one allowed image URL (default 10)")
    s.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per request, queueing included (default 300); a client's shorter deadline (gRPC "
                        "deadline, REST X-Request-Timeout) wins; past it the request is cancelled, also in the engine")
    s.add_argument("--max-queue", type=int,
                   help="requests allowed to wait beyond those running (replicas up x images per call); more get "
                        "HTTP 429 / gRPC RESOURCE_EXHAUSTED with Retry-After at once (default: replicas x --max-batch, "
                        "or x --max-batch-limit with auto)")
    s.add_argument("--tls-cert", help="PEM certificate: HTTPS for REST and the page, TLS for gRPC on --host "
                                      "(loopback stays plain gRPC for MII's client); with --tls-key")
    s.add_argument("--tls-key", help="PEM private key for --tls-cert")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="REST body limit (default 1 MiB)")
    s.add_argument("--threads", type=int, help="torch threads per replica (default: torch's)")
    s.add_argument("--lora-dir", help="folder of LoRA .safetensors files that requests may name with the `lora` "
                   "keyword (e.g. lora=\"name:0.8\"); --lora sets what requests that name none get")
    s.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the deployment")
    r = s.add_argument_group("Ray Serve (docs/ray.md): several machines, autoscaling")
    r.add_argument("--ray", action="store_true",
                   help="run on Ray Serve instead of MII: starts a one-machine Ray cluster (or joins --ray-address) "
                        "and serves the same HTTP routes on --rest-port (default 8000) through Serve's proxy")
    r.add_argument("--ray-address", help="a running Ray cluster to join (ray start --head prints it), e.g. "
                                         "10.0.0.5:6379; the application stays deployed there after the command")
    r.add_argument("--num-cpus", type=_resources, help="CPUs Ray reserves per engine replica (--ray; default 1)")
    r.add_argument("--num-gpus", type=_resources, help="GPUs per engine replica (--ray; e.g. 1, or 0.5 to share)")
    s.set_defaults(func=cmd_serve)

    q = subparsers.add_parser("query", parents=[gen_opts, image_options(resize=False)],
                              help="send prompts to a running deployment",
                              description="Send prompts to a running deployment through MII's client and save "
                                          "the images. With --image (and --mask): image-to-image (inpainting) "
                                          "through MII's InpaintingReply RPC on the deployment's NAME-inpaint "
                                          "record; the output has the image's size.")
    q.add_argument("deployment", help="deployment name")
    q.add_argument("prompt", nargs="+", help="one or more prompts")
    q.add_argument("--out", "-o", default="out/image.png", help="image path; several images get -0, -1, ...")
    q.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the reply")
    q.add_argument("--lora", help="NAME[:SCALE][,NAME[:SCALE]] from the deployment's --lora-dir")
    q.set_defaults(func=cmd_query)

    st = subparsers.add_parser("status", help="what a deployment runs: replicas, ports, model, uptime, requests")
    st.add_argument("deployment", nargs="?", help="deployment name (default: list them)")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    sp = subparsers.add_parser("stop", help="stop every process of a deployment")
    sp.add_argument("deployment", help="deployment name")
    sp.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the processes (default 30)")
    sp.set_defaults(func=cmd_stop)


def cmd_serve(args) -> int:
    if args.ray or args.ray_address is not None or args.num_cpus is not None or args.num_gpus is not None:
        if not args.ray:
            flag, value = next((f, v) for f, v in (("--ray-address", args.ray_address), ("--num-cpus", args.num_cpus),
                                                   ("--num-gpus", args.num_gpus)) if v is not None)
            raise InvalidParameter(flag, value, "only with --ray")
        from .ray.cli import serve_on_ray  # lazy: ray, only with --ray
        return serve_on_ray(args)
    check_config(args.model, args.config)
    if args.vae_tiny:
        load_tiny_vae(args.vae_tiny)  # checked before any process starts
    if args.gpus:
        args.device = "cuda"
    engine = dataclasses.asdict(optimize_config(args))
    loras = [(r.path, r.scale) for r in lora_refs(args)]
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if args.ui_port is not None and importlib.util.find_spec("gradio") is None:
        raise ServingError("--ui-port: the web page needs Gradio, which is not installed: pip install 'fastsd[ui]'")
    spec = serve(name=args.deployment, model=args.model, replicas=args.replicas, port=args.port,
                 rest_port=args.rest_port, ui_port=args.ui_port, host=args.host, token=token, gpus=args.gpus,
                 hostfile=args.hostfile, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                 max_batch_limit=args.max_batch_limit, batch_min_gain=args.batch_min_gain,
                 batch_probe_steps=args.batch_probe_steps,
                 limits=Limits(max_prompts=args.max_prompts, max_images=args.max_images, max_pixels=args.max_pixels,
                               max_steps=args.max_steps, timeout=args.timeout,
                               max_image_bytes=args.max_image_bytes, image_url_allow=tuple(args.image_url_allow),
                               image_url_timeout=args.image_url_timeout),
                 engine=engine, random_weights=args.random_weights, config=args.config,
                 allow_pickle=args.allow_pickle, threads=args.threads, max_body_bytes=args.max_body_bytes,
                 startup_timeout=args.startup_timeout, metrics_port=args.metrics_port, log_format=args.log_format,
                 ssh_config=args.ssh_config, lora_dir=args.lora_dir, loras=loras, max_queue=args.max_queue,
                 tls_cert=args.tls_cert, tls_key=args.tls_key, vae_tiny=args.vae_tiny)
    n = len(spec.replicas)
    print(f"deployment '{spec.name}' is up: {spec.model}, {n} replica(s), gRPC {spec.host}:{spec.port} "
          f"(inpainting and image-to-image: MII deployment '{record_name(spec.name, IMAGE_TASK)}')"
          + (f", REST http://{spec.host}:{spec.rest_port}/score" if spec.rest_port else "")
          + (f", page http://{spec.host}:{spec.ui_port}/" if spec.ui_port else "")
          + (f", metrics http://{spec.host}:{spec.metrics_port}/metrics" if spec.metrics_port else ""))
    print(f"clients: export MII_CACHE_PATH={cache_path()}; then mii.legacy.mii_query_handle({spec.name!r})")
    print(f"stop with: fastsd stop {spec.name}")
    return 0


def cmd_query(args) -> int:
    image, mask = read_images(args)  # missing, unreadable, mask without image: one line, before connecting
    for name, asked, size in (("height", args.height, image and image.height), ("width", args.width, image and image.width)):
        if image is not None and asked is not None and asked != size:
            raise InvalidParameter(name, asked, f"the image's {name} {size}, or none: the deployment takes the "
                                   "image at its own size (resize it before sending)")
    paths = output_paths(args.out, len(args.prompt) * args.num_images)
    images = {} if image is None else {"image": encode_png(image), "strength": args.strength,
                                       "mask_image": encode_png(mask) if mask is not None else None}
    images.update(kind_keywords(args, image))
    negatives = [args.negative if args.negative is not None else ""] * len(args.prompt)
    try:  # one request, as user code sends it; image-to-image and inpainting go to the image-task record
        reply = DeploymentClient(args.deployment, timeout=args.timeout).generate(
            args.prompt, negatives, **images, num_inference_steps=50 if args.steps is None else args.steps,
            guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
            scheduler=args.scheduler, num_images_per_prompt=args.num_images if args.num_images != 1 else None,
            lora=args.lora, eta=args.eta or None)  # eta 0 is the deployment's default: left out
    except DeploymentError as e:
        raise ServingError(f"{e.code}: {plain_message(e)}") from None
    for path, image, flagged in zip(paths, reply.images, reply.nsfw_content_detected):
        image.save(path)
        print(f"{path}" + ("  (flagged by the safety checker: black image)" if flagged else ""))
    return 0


def kind_keywords(args, image) -> dict:
    """--depth-map (the file's bytes as base64 text, read and checked here first) and --noise-level as the
    deployment's keywords; --tile-size is generate's only (a deployment runs 128-pixel windows)."""
    import base64
    from ..depth import read_depth_map  # lazy: numpy and PIL only for a depth map
    if args.tile_size is not None:
        raise InvalidParameter("tile_size", args.tile_size, "nothing with query (a deployment runs the x4 upscaler "
                               "with its default 128-pixel windows); fastsd generate takes it")
    out = {"noise_level": args.noise_level}
    if args.depth_map is not None:
        if image is None:
            raise InvalidParameter("depth_map", args.depth_map, "only together with --image (depth-to-image)")
        read_depth_map(args.depth_map)  # a PNG or .npy it can read: one line now rather than from the server
        with open(args.depth_map, "rb") as f:
            out["depth_map"] = base64.b64encode(f.read()).decode()
    return out


def cmd_status(args) -> int:
    if not args.deployment:
        names = list_deployments()
        rows = [status(n) for n in names]
        if args.json:
            print(json.dumps(rows, indent=1, default=str))
        elif not rows:
            print("no deployments")
        for s in rows if not args.json else []:
            print(f"{s['name']:<24} {s['status']:<8} {s['model']:<16} port {s['port']}"
                  f"  replicas {sum(r['state'] == 'up' for r in s['replicas'])}/{len(s['replicas'])}")
        return 0
    s = status(args.deployment)
    print(json.dumps(s, indent=1, default=str) if args.json else format_status(s))
    return 0 if s["status"] == "running" else 3


def cmd_stop(args) -> int:
    stop(args.deployment, timeout=args.timeout)
    return 0

