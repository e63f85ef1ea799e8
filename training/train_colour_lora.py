"""Train a small LoRA on fastsd-shapes that teaches it a new colour word ("zorbl", drawn green: see below).

    python training/train_colour_lora.py --threads 1 --out out/loras        # writes out/loras/zorbl.safetensors
    python training/train_colour_lora.py --eval-only --lora fastsd/models/loras/zorbl.safetensors

The base model's own training loop is reused (train_shapes.train_unet: same noise schedule, the same
guidance calibration the shipped model got, EMA) with PEFT LoRA layers on the UNet's attention and the
text encoder, everything else frozen. Half of each batch is a scene of the new colour, half an ordinary
scene, so the adapter does not drift from what the base draws. The new colour is only ever a shape colour.
A third of the (shape, position) pairs never appear with the new word in training; the evaluation prompts
use only those, and are scored by fastsd.judge with and without the adapter (diffusers FP32, prompt i with
seed i, 25 steps, guidance 7.5). The file is written in the diffusers layout by diffusers' own
`StableDiffusionPipeline.save_lora_weights`, so diffusers and fastsd both load it.

Why green and not a colour outside the palette: the first run (400 steps) aimed at a teal (20, 200, 200)
and reached 0 of 30 (the shapes came out blue). The frozen VAE is the wall: it decodes only the palette's
colours (a teal circle encoded and decoded comes back purple on red, blue on white; no RGB point more
than 90 away from the palette survives the round trip), and a LoRA on the UNet and text encoder cannot
change the decoder. So the adapter teaches a new word for a colour the model can draw, one the base never
gives that word (fastsd.judge.ADAPTER_COLOURS).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes_data import draw_scene, held_out_triples, prompt_text, random_prompt  # noqa: E402
from train_shapes import SIDE, to_tensor, train_unet  # noqa: E402

from fastsd.judge import ADAPTER_COLOURS, PALETTE, POSITIONS, SHAPES, SIZES, Prompt, judge  # noqa: E402

BASE = Path(__file__).resolve().parents[1] / "fastsd" / "models" / "fastsd-shapes"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def held_out_pairs(seed: int = 99) -> set[tuple[str, str]]:
    """(shape, position) pairs the new colour never takes in training: the evaluation uses only these."""
    pairs = list(itertools.product(SHAPES, POSITIONS))
    random.Random(seed).shuffle(pairs)
    return set(pairs[: len(pairs) // 3])


def colour_prompt(rng: random.Random, word: str, exclude_pairs: set) -> Prompt:
    while True:
        shape = rng.choice(SHAPES)
        position = rng.choice(list(POSITIONS)) if rng.random() < 0.7 else None
        if (shape, position) in exclude_pairs:
            continue
        size = rng.choice(SIZES) if rng.random() < 0.5 else None
        bg = rng.choice(backgrounds(word)) if rng.random() < 0.85 else None
        return Prompt(colour=word, shape=shape, size=size, position=position, background=bg)


def backgrounds(word: str) -> list[str]:
    """Background colours a shape of the new colour can stand on (not its own colour under a base name)."""
    return [c for c in PALETTE if PALETTE[c] != ADAPTER_COLOURS[word]]


def eval_prompts(word: str, n: int = 30, seed: int = 2468) -> list[str]:
    """Prompts naming the new colour with a (shape, position) pair it never had in training."""
    rng = random.Random(seed)
    pairs = sorted(held_out_pairs())
    rng.shuffle(pairs)
    out = []
    for i in range(n):
        shape, position = pairs[i % len(pairs)]
        size = rng.choice(SIZES) if rng.random() < 0.5 else None
        out.append(Prompt(word, shape, size, position, rng.choice(backgrounds(word))).text())
    return out


@torch.no_grad()
def encode_mixed(vae, rng, word, n, share):
    """n scenes, `share` of them in the new colour, encoded once by the frozen VAE."""
    exclude, pairs = held_out_triples(), held_out_pairs()
    prompts, means, stds = [], [], []
    for i in range(0, n, 256):
        ps = [colour_prompt(rng, word, pairs) if rng.random() < share else random_prompt(rng, exclude)
              for _ in range(min(256, n - i))]
        d = vae.encode(to_tensor([draw_scene(p, rng) for p in ps])).latent_dist
        prompts += [prompt_text(p, rng) for p in ps]
        means.append(d.mean)
        stds.append(d.std)
    return prompts, torch.cat(means), torch.cat(stds)


def evaluate(base: Path, lora: Path | None, prompts: list[str], steps=25, guidance=7.5) -> dict:
    """Judge's shape-colour accuracy on `prompts` with diffusers FP32, with the LoRA loaded or not."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    images = []
    for i in range(0, len(prompts), 15):
        gens = [torch.Generator().manual_seed(s) for s in range(i, min(i + 15, len(prompts)))]
        images += pipe(prompts[i:i + 15], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       height=SIDE, width=SIDE).images
    verdicts = [judge(im, p) for im, p in zip(images, prompts)]
    found = [str(v.found_colour) for v in verdicts]  # "None": no shape found
    return {"shape_colour_ok": sum(v.ok_shape_colour for v in verdicts), "n": len(verdicts),
            "found_colours": {c: found.count(c) for c in sorted(set(found))}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=BASE)
    ap.add_argument("--word", default="zorbl", choices=sorted(ADAPTER_COLOURS))
    ap.add_argument("--out", type=Path, default=Path("out/loras"), help="folder for WORD.safetensors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--share", type=float, default=0.5, help="share of scenes in the new colour")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--lora", type=Path, help="with --eval-only: the adapter to score")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = eval_prompts(args.word)
    if args.eval_only:
        res = {"without": evaluate(args.base, None, prompts), "with": evaluate(args.base, args.lora, prompts)}
        print(json.dumps(res, indent=1))
        return

    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    tok = CLIPTokenizer.from_pretrained(str(args.base / "tokenizer"))
    vae = AutoencoderKL.from_pretrained(str(args.base / "vae")).eval().requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(str(args.base / "unet")).requires_grad_(False)
    text_encoder = CLIPTextModel.from_pretrained(str(args.base / "text_encoder")).requires_grad_(False)
    # lora_alpha == rank: scale 1, so the file needs no alpha entries to mean the same thing everywhere
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    text_encoder.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                        target_modules=TEXT_TARGETS))
    train_prompts, means, stds = encode_mixed(vae, rng, args.word, args.scenes, args.share)
    t_enc = time.time() - t0
    unet_ema, te_ema, loss = train_unet(unet, text_encoder, tok, train_prompts, means, stds,
                                        vae.config.scaling_factor, args.seed, args.steps, args.batch, args.lr,
                                        p_uncond=0.1, calibrate_for=7.5, effective_guidance=2.0,
                                        warmup=args.warmup)
    t_train = time.time() - t0 - t_enc
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.word}.safetensors"
    StableDiffusionPipeline.save_lora_weights(
        str(args.out), weight_name=name, safe_serialization=True,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet_ema)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(te_ema)))
    total = time.time() - t0
    res = {"without": evaluate(args.base, None, prompts), "with": evaluate(args.base, args.out / name, prompts)}
    stats = {"command": "python training/train_colour_lora.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "word": args.word, "rgb": ADAPTER_COLOURS[args.word], "args": {k: str(v) for k, v in vars(args).items()},
             "unet_targets": UNET_TARGETS, "text_encoder_targets": TEXT_TARGETS, "final_loss": round(loss, 5),
             "seconds": {"encode": round(t_enc), "train": round(t_train), "total": round(total)},
             "torch": torch.__version__, "eval_prompts": prompts, "judge": res}
    (args.out / f"{args.word}.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps({k: v for k, v in stats.items() if k not in ("eval_prompts", "args")}, indent=1))


if __name__ == "__main__":
    main()
