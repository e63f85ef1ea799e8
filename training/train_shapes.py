"""Train fastsd-shapes, a toy Stable Diffusion that draws flat shapes on flat backgrounds, on the CPU.

    python training/train_shapes.py --out /tmp/stage1                       # VAE, then UNet + text encoder
    python training/train_shapes.py --init /tmp/stage1 --calibrate-for 7.5 --effective-guidance 2 \
        --unet-steps 1200 --unet-lr 3e-4 --scenes 10000 --out fastsd/models/fastsd-shapes   # guidance calibration

(The first command alone also writes a complete folder, but plain guidance 7.5 overshoots with it; see
the model card. Use --threads 1 when the cores are shared: 2 threads under contention crawl.)

Everything is generated here from a seed: the scenes (drawn with PIL), their prompts, the CLIP-format
tokenizer (one token per word), then the VAE is trained, the scenes are encoded once, and the UNet is
trained jointly with the text encoder (epsilon prediction, SD's noise schedule, 10% empty prompts for
classifier-free guidance). The result is a folder StableDiffusionPipeline.from_pretrained loads as is.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shapes_data import draw_scene, eval_prompts, held_out_triples, prompt_text, random_prompt  # noqa: E402

from fastsd.judge import PALETTE, POSITIONS, SHAPES, SIZES  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

SIDE = 64
MAX_LEN = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
WORDS = sorted(set(" ".join(list(PALETTE) + list(SHAPES) + list(SIZES) + list(POSITIONS)
                            + ["a", "an", "in", "at", "on", "the", "background", "of", "and", "with"]).split()))


# ---------------------------------------------------------------- tokenizer (CLIP BPE format, by hand)
def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def bpe(word: str, ranks: dict) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build_tokenizer(words: list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """vocab.json and merges.txt contents that turn each word into one token and any text into something."""
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for w in words:
        while len(parts := bpe(w, ranks)) > 1:  # add the missing merge; later merges never change earlier words
            ranks[(parts[0], parts[1])] = len(merges)
            merges.append((parts[0], parts[1]))
    syms = byte_symbols()
    tokens = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_tokenizer(WORDS)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LEN, "do_lower_case": True,
         "clean_up_tokenization_spaces": False, "errors": "replace", **special}, indent=2))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    for w in WORDS:  # every word of the grammar is one token
        ids = tok(w).input_ids
        assert len(ids) == 3 and ids[1] == vocab[w + "</w>"], (w, ids)
    return tok


# ---------------------------------------------------------------- models
def make_models(vocab_size: int, tok: CLIPTokenizer, dim: int):
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIDE, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=dim, hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=SIDE // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=dim, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return vae, text_encoder, unet


def to_tensor(imgs) -> torch.Tensor:
    a = np.stack([np.asarray(i, dtype=np.float32) for i in imgs]) / 127.5 - 1.0
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def scenes(rng: random.Random, n: int, exclude: set):
    prompts = [random_prompt(rng, exclude) for _ in range(n)]
    return [prompt_text(p, rng) for p in prompts], to_tensor([draw_scene(p, rng) for p in prompts])


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------- training phases
def train_vae(vae, rng, exclude, steps, batch, lr, kl_weight):
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="vae", mininterval=5)
    ema_loss = None
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        _, x = scenes(rng, batch, exclude)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # Shape pixels weigh 5x: they are a small share of each image and the first thing a VAE drops.
        w = 1.0 + 4.0 * (x != x[:, :, :1, :1]).any(1, keepdim=True).float()
        err = rec - x
        loss_rec = (w * (err ** 2 + 0.5 * err.abs())).mean() / w.mean()
        loss = loss_rec + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        ema_loss = loss_rec.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss_rec.item()
        bar.set_postfix(rec=f"{ema_loss:.4f}")
    return ema_loss


@torch.no_grad()
def encode_dataset(vae, rng, exclude, n):
    prompts, means, stds = [], [], []
    for i in tqdm(range(0, n, 256), desc="encode", mininterval=5):
        p, x = scenes(rng, min(256, n - i), exclude)
        d = vae.encode(x).latent_dist
        prompts += p
        means.append(d.mean)
        stds.append(d.std)
    return prompts, torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tok, prompts, means, stds, scale, seed, steps, batch, lr, p_uncond,
               calibrate_for=0.0, effective_guidance=1.0, warmup=200):
    """Epsilon loss with prompt dropout. With calibrate_for=w, conditional rows regress on
    (1 - s) * eps_uncond + s * noise, s = effective_guidance / w (eps_uncond from the model itself, no grad):
    classifier-free guidance at scale w then equals guidance `effective_guidance` of a plain model."""
    ids = tok(prompts, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids
    sched = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (unet, text_encoder)]
    ema_params = [p for m in ema for p in m.parameters()]
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="unet", mininterval=5)
    ema_loss = None
    for step in bar:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, warmup)
        idx = torch.randint(0, len(prompts), (batch,), generator=g)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scale
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        b_ids = torch.where((torch.rand(batch, generator=g) < p_uncond)[:, None], empty, ids[idx])
        cond = text_encoder(b_ids).last_hidden_state
        noisy = sched.add_noise(z, noise, t)
        pred = unet(noisy, t, cond).sample
        target = noise
        if calibrate_for:
            with torch.no_grad():
                eps_u = unet(noisy, t, text_encoder(empty.expand(batch, -1)).last_hidden_state).sample
            s = effective_guidance / calibrate_for
            uncond = (b_ids == empty).all(1)[:, None, None, None]
            target = torch.where(uncond, noise, (1 - s) * eps_u + s * noise)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.99 * ema_loss + 0.01 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}")
    return ema[0], ema[1], ema_loss


# ---------------------------------------------------------------- saving
def save_text_encoder(text_encoder: CLIPTextModel, folder: Path):
    """config.json + model.safetensors with the `text_model.` prefix transformers 4 expects."""
    folder.mkdir(parents=True, exist_ok=True)
    text_encoder.config.save_pretrained(str(folder))
    sd = {k if k.startswith("text_model.") else "text_model." + k: v.detach().contiguous().clone()
          for k, v in text_encoder.state_dict().items()}
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save_pipeline(out: Path, vae, text_encoder, unet):
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    save_text_encoder(text_encoder, out / "text_encoder")
    PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                  prediction_type="epsilon").save_pretrained(str(out / "scheduler"))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")


CARD = """# fastsd-shapes

A toy Stable Diffusion (same architecture family as SD 1.x, at toy scale) that ships inside fastsd so
that the engine has a default model which draws what it is told, needs no download, and can be checked
by a judge that needs no model (`fastsd.judge`). It was trained from scratch on this repository's CPU by
`training/train_shapes.py`; nothing here comes from another model.

## What it draws
One flat shape on a flat background, 64x64, from prompts of the form

    a [small|large] COLOUR SHAPE [in the top left|in the top right|in the bottom left|in the bottom right|
                                  at the center|at the top|at the bottom|at the left|at the right]
                                 [on a COLOUR background]

COLOUR: {colours}. SHAPE: {shapes}. E.g. "a red circle on a blue background",
"a small green square in the top left on a purple background". Words outside this grammar still
tokenize (byte-level fallback) but mean nothing to the model. Use guidance 7.5 and ~25 steps.

## Components (a standard diffusers folder; `StableDiffusionPipeline.from_pretrained(folder)`)
- `tokenizer/`: CLIP BPE format (`vocab.json`, `merges.txt`, `tokenizer_config.json`, model_max_length 77),
  {vocab} entries: the 256 byte symbols with and without `</w>`, merges that make each grammar word one
  token, `<|startoftext|>`, `<|endoftext|>` (also pad and unk).
- `text_encoder/`: `CLIPTextModel`, hidden {dim}, 2 layers, 4 heads; the UNet reads `last_hidden_state`.
  Weight names keep the `text_model.` prefix so transformers 4 and 5 both load them.
- `vae/`: `AutoencoderKL`, 4 blocks (16, 32, 64, 64), 4 latent channels, 64x64 image -> 8x8 latent,
  scaling_factor {scale} (1 / std of the training latents).
- `unet/`: `UNet2DConditionModel`, blocks (32, 64, 64) with cross-attention in the first two, 1 layer per block,
  cross_attention_dim {dim}, epsilon prediction.
- `scheduler/`: `PNDMScheduler` with SD's schedule (1000 steps, scaled_linear 0.00085..0.012,
  skip_prk_steps, steps_offset 1, set_alpha_to_one false). No safety checker, no feature extractor.
- `eval_prompts.json`: {n_eval} held-out evaluation prompts. `training_stats.json`: the run's figures.

## How it was trained
{commands}

Seed {seed}, {threads} CPU thread(s), torch {torch}, diffusers {diffusers}. Data is generated on the fly with
PIL (`training/shapes_data.py`): random prompts from the grammar (size named half the time, position 70%,
background 85%; what is not named is drawn at random) and the scene they describe. {n_held} of the
{n_triples} (colour, shape, position) combinations never appear in a training prompt; the evaluation
prompts use only those.

1. VAE: {vae_steps} steps at batch {vae_batch}, AdamW, MSE + 0.5 L1 with shape pixels weighted 5x,
   KL weight {kl}. Final reconstruction loss {vae_rec}. {t_vae} s.
2. {scenes} scenes encoded once (posterior mean and std; latents are sampled from them each step). {t_enc} s.
3. UNet and text encoder jointly: {unet_steps} steps at batch {unet_batch}, AdamW lr {unet_lr} (warm-up, cosine),
   epsilon loss on SD's noise schedule, the prompt replaced by "" {p_uncond_pct}% of the time (classifier-free
   guidance), EMA of the weights (decay 0.998). Final loss {unet_loss}. {t_unet} s.
{stage2}
Total {t_total} s ({t_min} min) of training on a shared 2-core CPU.
"""


STAGE2 = """4. Guidance calibration (second command): {steps} steps at batch {batch}, lr {lr}, from stage 1's weights,
   {scenes} freshly drawn and encoded scenes. Plain classifier-free guidance at 7.5 overshoots with a model
   this small (flat saturated blobs), so conditional rows regress on (1 - s) * eps_uncond + s * noise with
   s = {g_eff} / {w} (eps_uncond from the model itself, no gradient): guidance {w} in a stock pipeline then acts
   like guidance {g_eff} of the stage-1 model. Guidance 1 is therefore weakly conditioned. Final loss {loss}
   (against the calibrated target). {t} s.
"""


def write_card(out: Path, stats: dict):
    s1 = stats.get("stage1", stats)
    a, a2 = s1["args"], stats["args"]
    cmds = ([s1["command"]] if "stage1" in stats else []) + [stats["command"]]
    stage2 = STAGE2.format(steps=a2["unet_steps"], batch=a2["unet_batch"], lr=a2["unet_lr"], scenes=a2["scenes"],
                           g_eff=a2["effective_guidance"], w=a2["calibrate_for"], loss=stats["unet_loss"],
                           t=stats["seconds"]["total"]) if "stage1" in stats else ""
    total = stats["seconds"]["total"] + (s1["seconds"]["total"] if "stage1" in stats else 0)
    (out / "README.md").write_text(CARD.format(
        colours=", ".join(PALETTE), shapes=", ".join(SHAPES), dim=a["text_dim"],
        vocab=len(json.loads((out / "tokenizer" / "vocab.json").read_text())), scale=round(s1["scaling_factor"], 5),
        n_eval=len(json.loads((out / "eval_prompts.json").read_text())),
        commands="\n".join("    " + c for c in cmds), stage2=stage2,
        seed=stats["seed"], threads=stats["threads"], torch=stats["torch"], diffusers=stats["diffusers"],
        n_held=len(stats["held_out_triples"]), n_triples=len(PALETTE) * len(SHAPES) * len(POSITIONS),
        vae_steps=a["vae_steps"], vae_batch=a["vae_batch"], kl=a["kl_weight"], vae_rec=s1["vae_reconstruction_loss"],
        t_vae=s1["seconds"]["vae"], scenes=a["scenes"], t_enc=s1["seconds"]["encode"],
        unet_steps=a["unet_steps"], unet_batch=a["unet_batch"], unet_lr=a["unet_lr"],
        p_uncond_pct=round(100 * float(a["p_uncond"])), unet_loss=s1["unet_loss"], t_unet=s1["seconds"]["unet"],
        t_total=total, t_min=round(total / 60, 1)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # not the shipped folder by default: a run must not overwrite the weights the package ships
    ap.add_argument("--out", type=Path, default=Path("out/fastsd-shapes"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5)
    ap.add_argument("--scenes", type=int, default=20000, help="scenes encoded once for the UNet phase")
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--unet-batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--text-dim", type=int, default=64)
    ap.add_argument("--init", type=Path, help="stage 2: start from this folder (a stage-1 output), skip the VAE")
    ap.add_argument("--calibrate-for", type=float, default=0.0,
                    help="guidance scale to calibrate the UNet for (stage 2; 0: plain training)")
    ap.add_argument("--effective-guidance", type=float, default=2.0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    exclude = held_out_triples()
    out = args.out
    tok = write_tokenizer(out / "tokenizer")
    if args.init:
        vae = AutoencoderKL.from_pretrained(str(args.init / "vae"))
        text_encoder = CLIPTextModel.from_pretrained(str(args.init / "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(args.init / "unet"))
        stage1 = json.loads((args.init / "training_stats.json").read_text())
        vae_rec, scale = stage1["vae_reconstruction_loss"], vae.config.scaling_factor
        rng = random.Random(args.seed + 1)
    else:
        vae, text_encoder, unet = make_models(len(tok), tok, args.text_dim)
        vae_rec = train_vae(vae, rng, exclude, args.vae_steps, args.vae_batch, args.vae_lr, args.kl_weight)
    vae.eval().requires_grad_(False)
    t_vae = time.time() - t0
    prompts, means, stds = encode_dataset(vae, rng, exclude, args.scenes)
    if not args.init:
        scale = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scale)
    t_enc = time.time() - t0 - t_vae

    unet_ema, te_ema, unet_loss = train_unet(unet, text_encoder, tok, prompts, means, stds, scale, args.seed,
                                             args.unet_steps, args.unet_batch, args.unet_lr, args.p_uncond,
                                             args.calibrate_for, args.effective_guidance)
    total = time.time() - t0
    save_pipeline(out, vae, te_ema, unet_ema)
    (out / "eval_prompts.json").write_text(json.dumps(eval_prompts(), indent=1) + "\n")
    stats = {"command": "python training/train_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "seed": args.seed, "threads": args.threads, "args": {k: str(v) for k, v in vars(args).items()},
             "vae_reconstruction_loss": round(vae_rec, 5), "unet_loss": round(unet_loss, 5),
             "scaling_factor": round(scale, 5), "seconds": {"vae": round(t_vae), "encode": round(t_enc),
                                                            "unet": round(total - t_vae - t_enc), "total": round(total)},
             "torch": torch.__version__, "diffusers": diffusers.__version__,
             "held_out_triples": sorted(map(list, exclude))}
    if args.init:
        stats["stage1"] = {k: v for k, v in stage1.items() if k != "held_out_triples"}
    (out / "training_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    write_card(out, stats)
    print(json.dumps({k: v for k, v in stats.items() if k not in ("held_out_triples", "args")}, indent=1))


if __name__ == "__main__":
    main()
