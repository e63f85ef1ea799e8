"""`fastsd batch INPUT --out DIR`: every row of a CSV file (or a folder of them) to an image, in the Azure ML
batch endpoint's output format, through the local engine or a running deployment; resumable."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import validation as check
from ..errors import InvalidParameter
from ..options import check_generation_args, load_for, lora_refs, optimize_config
from ..presets import DEFAULT_MODEL
from ..serving.client import DeploymentClient
from .inputs import read_rows
from .runners import DeploymentRunner, LocalRunner, Options
from .store import OutputFull, OutputStore

EXIT_FULL = 4  # the output folder's disk is full: rerun to resume


def register(subparsers, parents) -> None:
    model_opts, gen_opts = parents
    b = subparsers.add_parser(
        "batch", parents=[model_opts, gen_opts], help="generate one image per row of CSV files (Azure ML batch format)",
        description="Generate one image per row of a CSV file, or of every CSV file in a folder (a 'prompt' column; "
                    "optional 'negative_prompt' and 'seed'). Writes DIR/<csv stem>-<row>.png and DIR/predictions.csv "
                    "(no header: row_number_per_file, prompt, generated_image, nsfw_content_detected, "
                    "input_csv_name), as the Azure ML batch endpoint does. Rows that fail go to DIR/errors.csv and the "
                    "batch goes on (exit 1). Run it again on the same INPUT and DIR to finish an interrupted batch: "
                    "rows already done are skipped. A row without a seed gets --seed (default 0) plus its row number. "
                    "Optional columns 'image' and 'mask_image' (a file path relative to the CSV file's folder, or "
                    "base64) make a row image-to-image or inpainting, 'strength' sets how much is repainted, and "
                    "'lora' names adapters as NAME[:SCALE][,NAME[:SCALE]] (the deployment's --lora-dir, or "
                    "--lora-dir here); a bad value fails its row only. Exit codes: 0 every row done, 1 a row failed, "
                    "2 bad input or options, 4 the output folder's disk is full (rerun to resume).")
    b.add_argument("input", help="a .csv file, or a folder of .csv files")
    b.add_argument("--out", "-o", required=True, help="output folder (created if missing)")
    b.add_argument("--deployment", "-d", help="send rows to this running deployment (`fastsd serve`) instead of "
                                              "loading a model here")
    b.add_argument("--batch-size", type=int, default=4,
                   help="local engine: rows per engine call (default 4)")
    b.add_argument("--lora-dir", help="local engine: folder of LoRA .safetensors files that the 'lora' column names "
                                      "(with --deployment, names are the deployment's own --lora-dir)")
    b.add_argument("--concurrency", type=int,
                   help="--deployment: requests in flight (default: the deployment's replicas x its --max-batch, "
                        "or its --max-batch-limit with auto)")
    b.set_defaults(func=cmd_batch)


def _check(args) -> None:
    check_generation_args(args)
    if args.num_images != 1:
        raise InvalidParameter("num_images", args.num_images, "1 (the batch format has one image per row)")
    if not 1 <= args.batch_size <= check.MAX_IMAGES:
        raise InvalidParameter("batch_size", args.batch_size, f"an integer in [1, {check.MAX_IMAGES}]")
    if args.concurrency is not None and not 1 <= args.concurrency <= 256:
        raise InvalidParameter("concurrency", args.concurrency, "an integer in [1, 256]")
    if args.deployment and args.model != DEFAULT_MODEL:
        raise InvalidParameter("deployment", args.deployment, "either --deployment or --model, not both "
                                                              "(the deployment's model draws the images)")
    if args.deployment:  # the deployment's engine draws the images; its flags were set by `fastsd serve`
        given = [f for f in ("dtype", "attention", "profile", "config", "vae_tiny") if getattr(args, f) is not None]
        given += [f for f in ("random_weights", "fused_ops", "cuda_graphs", "compile", "no_safety_checker",
                              "allow_pickle") if getattr(args, f)]
        given += ["backend"] if args.backend not in (None, "torch") else []
        given += ["lora"] if args.lora else []
        given += ["lora_dir"] if args.lora_dir else []
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InvalidParameter("deployment", args.deployment, f"no engine options beside it ({flag}): the "
                                                                  "deployment's engine was set by `fastsd serve`")
    if args.concurrency is not None and not args.deployment:
        raise InvalidParameter("concurrency", args.concurrency, "only with --deployment (locally: --batch-size)")


def cmd_batch(args) -> int:
    try:
        return run_batch(args)
    except OutputFull as e:
        print(f"fastsd batch: error: {e}", file=sys.stderr)
        return EXIT_FULL


def run_batch(args) -> int:
    from tqdm import tqdm

    _check(args)
    loras = default_loras = None
    if not args.deployment:
        default_loras = [(r.path, r.scale) for r in lora_refs(args)]
        if args.lora_dir:
            from ..serving.loras import LoraCatalog  # torch (fastsd.lora): only a local batch with --lora-dir
            loras = LoraCatalog(args.lora_dir)
    rows = read_rows(args.input)
    options = Options(steps=50 if args.steps is None else args.steps, guidance=args.guidance, height=args.height,
                      width=args.width, scheduler=args.scheduler, negative=args.negative,
                      seed=0 if args.seed is None else args.seed, eta=args.eta)
    if args.deployment:
        client = DeploymentClient(args.deployment)
        model = client.spec.model
        concurrency = args.concurrency or len(client.spec.replicas) * client.spec.max_images_per_call
        runner = DeploymentRunner(client, options, concurrency)
        where = f"deployment {args.deployment} ({concurrency} requests in flight)"
    else:
        model = args.model
    fingerprint = {"model": model, "steps": options.steps, "guidance": options.guidance, "height": options.height,
                   "width": options.width, "scheduler": options.scheduler, "negative": options.negative,
                   "seed": options.seed}
    if options.eta:  # added only when set, so that a store written before eta existed still resumes
        fingerprint["eta"] = options.eta
    if args.vae_tiny:
        fingerprint["vae_tiny"] = str(Path(args.vae_tiny).expanduser().resolve())
    if default_loras or loras:  # images drawn with adapters differ: a rerun must use the same ones
        fingerprint.update(lora=[[str(p), sc] for p, sc in default_loras],
                           lora_dir=str(loras.folder) if loras else None)
    store = OutputStore(args.out, rows, fingerprint)

    bad = [r for r in rows if r.error]
    for r in bad:
        store.failed(r, r.error)
    runnable = [r for r in rows if not r.error]
    done = sum(store.is_done(r) for r in runnable)
    if not args.deployment:
        from ..optimize import optimize  # torch and diffusers: a batch through a deployment does without them
        engine = optimize(load_for(args), optimize_config(args))
        if default_loras:
            engine.set_loras(default_loras, allow_pickle=args.allow_pickle)
        runner = LocalRunner(engine, options, args.batch_size, loras, default_loras)
        where = f"{engine.describe()['model']} here, {args.batch_size} rows per engine call"
    groups = [g for g in runner.groups(runnable) if not all(store.is_done(r) for r in g)]
    store.flush()
    print(f"fastsd batch: {len(rows)} rows in {args.input}; {done} already done in {store.dir}"
          + (", skipping them" if done else "") + f"; {len(bad)} bad; running {len(runnable) - done} on {where}",
          file=sys.stderr)

    failed = len(bad)
    t0 = time.perf_counter()
    made = 0
    with tqdm(total=len(runnable), initial=done, unit="img", desc="batch", disable=args.quiet,
              dynamic_ncols=True) as bar:
        for group, results in runner.run(groups):
            for row, result in zip(group, results):
                if isinstance(result, str):
                    store.failed(row, result)
                    failed += 1
                    continue
                already = store.is_done(row)  # a row redone with its group (see runners.chunks)
                store.save_image(row, result[0])
                store.done(row, result[1])
                if not already:
                    bar.update(1)
                    made += 1
            store.flush()
    elapsed = time.perf_counter() - t0
    rate = f", {made / elapsed:.2f} images/s" if made and elapsed > 0 else ""
    print(f"fastsd batch: {len(store.predictions)} of {len(rows)} rows done in {store.dir}/predictions.csv "
          f"({made} new in {elapsed:.1f} s{rate}); {failed} failed"
          + (f", see {store.dir}/errors.csv" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
