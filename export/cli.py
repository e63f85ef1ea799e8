"""`fastsd export`: a model as ONNX graphs checked against PyTorch FP32, plus TensorRT profiles."""
from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers, parents):
    from fastsd.options import add_model_source  # lazy: torch after parsing
    from .graphs import COMPONENTS  # lazy: torch after parsing
    p = subparsers.add_parser(
        "export", help="export a model to ONNX graphs for ONNX Runtime and TensorRT",
        description="Write the text encoder, UNet, VAE decoder and VAE encoder of a model as ONNX graphs in the "
                    "folder layout ONNX Runtime's, Optimum's and diffusers' ONNX pipelines load; run each graph "
                    "in ONNX Runtime (CPU) against the PyTorch FP32 module and fail beyond the tolerance of its "
                    "dtype; write trt_profiles.json and BUILD_TENSORRT.md for TensorRT. Run the export with "
                    "`fastsd generate|verify --backend onnxruntime --model DIR`.")
    add_model_source(p.add_argument_group("model"))
    e = p.add_argument_group("export")
    e.add_argument("--out", "-o", required=True, help="output folder (new or empty; see --overwrite)")
    e.add_argument("--components", default=",".join(COMPONENTS),
                   help=f"comma-separated graphs to export (default: all: {','.join(COMPONENTS)}; vae = both VAE parts)")
    e.add_argument("--opset", default="17", help="ONNX opset, 14..20 (default 17)")
    e.add_argument("--dtype", default="fp32",
                   help="fp32 | fp16 (fp16 keeps float32 inputs and outputs; default fp32)")
    e.add_argument("--static", action="store_true", help="fixed shapes (the OPT values of --batch and --resolution)")
    e.add_argument("--batch", default="1:1:4",
                   help="images per call MIN:OPT:MAX (the UNet gets twice that with guidance; default 1:1:4)")
    e.add_argument("--resolution", default=None,
                   help="square image size in pixels MIN:OPT:MAX (default: native/2:native:2*native)")
    e.add_argument("--optimize", action="store_true",
                   help="run onnxruntime's transformer optimizer: model.onnx = CPU-safe fusions, "
                        "model.gpu.onnx = all fusions (CUDA/TensorRT providers only)")
    e.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines (<graph>/model.plan); needs the tensorrt package")
    e.add_argument("--overwrite", action="store_true", help="replace an export already in --out")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from fastsd.loading import load_model  # lazy: torch after parsing
    from .exporter import ExportOptions, export_model, prepare_out  # lazy: torch after parsing
    opts = ExportOptions(components=args.components, opset=args.opset, dtype=args.dtype, static=args.static,
                         batch=args.batch, resolution=args.resolution, optimize=args.optimize,
                         tensorrt=args.tensorrt, overwrite=args.overwrite, progress=not args.quiet).validated()
    created = not Path(args.out).expanduser().exists()
    out = prepare_out(args.out, args.overwrite)  # fail fast, before the model loads
    spec = args.model
    if Path(spec).expanduser().exists():
        spec = str(Path(spec).expanduser().resolve())
    try:
        model = load_model(args.model, random_weights=args.random_weights, allow_pickle=args.allow_pickle,
                           config=args.config, safety_checker=False,  # the safety checker is not exported
                           vae_tiny=args.vae_tiny)
        source = {"spec": spec, "random_weights": args.random_weights, "seed": 0,
                  "allow_pickle": args.allow_pickle, "config": args.config}
        info = export_model(model, out, opts, source=source, echo=print)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # leave no empty folder behind a failed export
        raise
    n = sum(len(g) for g in info["graphs"].values())
    print(f"wrote {out}: {n} graph(s) ({info['dtype']}, opset {info['opset']}, "
          f"{'static' if info['static'] else 'dynamic'} shapes), trt_profiles.json, BUILD_TENSORRT.md"
          + (", TensorRT engines" if info["tensorrt"] else ""))
    if {"text_encoder", "unet", "vae_decoder"} <= set(info["components"]):
        flag = f" --dtype {info['dtype']}" if info["dtype"] != "fp32" else ""
        print(f"run it:   fastsd generate --backend onnxruntime --model {out}{flag} \"a prompt\"\n"
              f"check it: fastsd verify --backend onnxruntime --model {out}{flag}", file=sys.stderr)
    return 0
