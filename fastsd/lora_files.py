"""Seeded random LoRA files for a model, in both layouts people download: the diffusers/PEFT layout (written
by diffusers' own `save_lora_weights`) and the kohya/A1111 layout (`lora_unet_<module>.lora_down.weight`,
`.lora_up.weight`, `.alpha`, module dots as underscores, as kohya's sd-scripts name them). Tests and
benchmarks use them; they carry the real cost of a LoRA of that rank, not a meaning."""
from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _targets(module: torch.nn.Module, suffixes) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in module.named_modules()
            if n.endswith(tuple(suffixes)) and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def random_factors(model, *, rank: int = 4, seed: int = 0, unet_targets=UNET_TARGETS,
                   text_targets=TEXT_TARGETS, std: float = 0.05) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"unet.<module>" | "text_encoder.<module>": (down [r, in], up [out, r])} for the model's modules.
    `text_targets=()` gives a UNet-only LoRA."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, root, suffixes in (("unet", model.unet, unet_targets), ("text_encoder", model.text_encoder, text_targets)):
        for name, m in _targets(root, suffixes):
            if isinstance(m, torch.nn.Conv2d):
                down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std
                up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
            else:
                down = torch.randn(rank, m.in_features, generator=g) * std
                up = torch.randn(m.out_features, rank, generator=g) * std
            out[f"{comp}.{name}"] = (down, up)
    return out


def save_diffusers_layout(factors: dict, path, *, alpha: float | None = None) -> Path:
    """Write `factors` as diffusers writes a PEFT LoRA (`unet.<module>.lora_A.weight`, ...). With `alpha`,
    the PEFT config goes into the file's metadata (lora_alpha), as diffusers does."""
    from diffusers import StableDiffusionPipeline
    path = Path(path)
    layers = {"unet": {}, "text_encoder": {}}
    ranks, modules = {}, {"unet": [], "text_encoder": []}
    for key, (down, up) in factors.items():
        comp, module = key.split(".", 1)
        layers[comp][f"{module}.lora_A.weight"] = down.contiguous()
        layers[comp][f"{module}.lora_B.weight"] = up.contiguous()
        ranks[comp] = down.shape[0]
        modules[comp].append(module)
    meta = {}
    if alpha is not None:  # the PEFT LoraConfig fields diffusers reads back when it loads the file
        meta = {f"{c}_lora_adapter_metadata": {"r": r, "lora_alpha": alpha, "target_modules": modules[c]}
                for c, r in ranks.items()}
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True,
        unet_lora_layers=layers["unet"] or None, text_encoder_lora_layers=layers["text_encoder"] or None, **meta)
    return path


def save_kohya_layout(factors: dict, path, *, alpha: float | None = None) -> Path:
    """Write `factors` in the kohya/A1111 layout. Text-encoder modules are named from `text_model.` as the
    transformers CLIPTextModel of kohya's tools names them."""
    from safetensors.torch import save_file
    path = Path(path)
    sd = {}
    for key, (down, up) in factors.items():
        comp, module = key.split(".", 1)
        if comp == "text_encoder":
            stem = "lora_te_" + ("" if module.startswith("text_model.") else "text_model_") + module.replace(".", "_")
        else:
            stem = "lora_unet_" + module.replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = down.contiguous()
        sd[f"{stem}.lora_up.weight"] = up.contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(float(alpha if alpha is not None else down.shape[0]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt"})
    return path


def main(argv=None) -> int:
    """python -m fastsd.lora_files --model fastsd-shapes --rank 4 --out out/random.safetensors [--layout kohya]"""
    import argparse

    from .loading import load_model  # lazy: diffusers' model classes only for a model spec
    ap = argparse.ArgumentParser(description="Write a seeded random LoRA file for a model (for trying and timing).")
    ap.add_argument("--model", default="fastsd-shapes")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=None, help="default: the rank (scale 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.05)
    ap.add_argument("--layout", choices=["diffusers", "kohya"], default="diffusers")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    model = load_model(args.model, random_weights=args.random_weights, safety_checker=False)
    factors = random_factors(model, rank=args.rank, seed=args.seed, std=args.std)
    save = save_kohya_layout if args.layout == "kohya" else save_diffusers_layout
    print(save(factors, args.out, alpha=args.alpha))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
