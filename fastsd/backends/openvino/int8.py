"""int8 UNet for the openvino backend: NNCF post-training quantization, calibrated on real denoising inputs.

Calibration runs a short FP32 denoising loop (through the backend's own f32 graphs) for each calibration
prompt and records every UNet input; NNCF collects activation ranges on them and writes an int8 UNet, which
is cached on disk next to the compiled models (keyed by the export, the prompts and the recipe), so the
quantization runs once per model. Which layers stay in higher precision is RECIPES' data, measured with
`fastsd verify --int8` (README, "int8"); the non-quantized ops run at --dtype's precision."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidParameter, ModelLoadError

log = logging.getLogger("fastsd")

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parents[2] / "models" / "calibration_prompts.txt"
CALIBRATION_STEPS = 6  # denoising steps recorded per prompt: early, middle and late noise levels
# The largest calibration image side: one f32 UNet call of SD at 512 takes seconds on a small CPU, and the
# activation ranges NNCF collects are per channel, so a smaller image measures them at a fraction of the cost.
CALIBRATION_MAX_SIZE = 256
MAX_PROMPTS = 64

# What is quantized. "hybrid" is optimum-intel's recipe for diffusion UNets: activations and weights of the
# convolutions in int8, the attention/feed-forward MatMuls with int8 weights only (their activations stay at
# --dtype), SmoothQuant off. "full" quantizes the MatMuls' activations as well.
RECIPES = ("hybrid", "full")
# Layers kept out of int8 (regular expressions over the graph's op names; LAST: the last up block), measured
# with verify on fastsd-shapes, bf16 + hybrid, 25 steps (README, "int8"): all in int8 gave latent cosine
# 0.93 (fails); keeping conv_in/conv_out 0.983-0.992; also the full-resolution blocks 0.990-0.998.
KEEP = [r".*/conv_in/.*", r".*/conv_out/.*", r".*/down_blocks\.0/.*", r".*/up_blocks\.LAST/.*"]


def keep_patterns(model) -> list[str]:
    last = str(len(model.unet.config.block_out_channels) - 1)
    return [k.replace("LAST", last) for k in KEEP]


def read_prompts(path: str | None) -> list[str]:
    """The calibration prompts: one per non-empty line of `path` (the shipped default set when None)."""
    p = Path(path) if path else DEFAULT_PROMPTS_FILE
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameter("calibration_prompts", str(p), f"a readable UTF-8 text file, one prompt a line "
                               f"({type(e).__name__})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise InvalidParameter("calibration_prompts", str(p), f"a file of 1..{MAX_PROMPTS} prompts, one a line "
                               f"(it has {len(prompts)})")
    return prompts


def calibration_size(model) -> int:
    size = min(model.native_size, CALIBRATION_MAX_SIZE)
    return max(64, size - size % (8 * model.vae_scale_factor))


def calibration_inputs(model, text_encoder, unet, prompts: list[str], *, steps: int = CALIBRATION_STEPS,
                       guidance: float = 7.5, seed: int = 0) -> list[dict]:
    """Every UNet input of a `steps`-step guided FP32 run per prompt at calibration_size(model)."""
    size = calibration_size(model)
    scale = model.vae_scale_factor
    channels = int(model.unet.config.in_channels)
    uncond = _ids(model, [""])
    feeds = []
    for i, prompt in enumerate(prompts):
        ids = np.concatenate([uncond, _ids(model, [prompt])])
        ehs = text_encoder.run({"input_ids": ids.astype(text_encoder.dtype("input_ids"))}).astype(np.float32)
        scheduler = copy.deepcopy(model.scheduler)
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed + i)
        latents = torch.randn(1, channels, size // scale, size // scale, generator=g) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            ts = np.asarray(float(t), dtype=unet.dtype("timestep"))
            if unet.input_shape("timestep").rank.get_length() == 1:
                ts = ts.reshape(1)
            feed = {"sample": sample.numpy().astype(np.float32), "timestep": ts, "encoder_hidden_states": ehs}
            feeds.append(feed)
            noise = torch.from_numpy(unet.run(feed))
            n_uncond, n_text = noise.chunk(2)
            latents = scheduler.step(n_uncond + guidance * (n_text - n_uncond), t, latents).prev_sample
    return feeds


def _ids(model, prompts: list[str]) -> np.ndarray:
    tok = model.tokenizer
    return np.asarray(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="np").input_ids, dtype=np.int64)


def quantize(core, unet_path: Path, feeds: list[dict], recipe: str, out: Path, keep: list[str]) -> Path:
    """NNCF post-training quantization of the ONNX UNet at `unet_path` into `out` (OpenVINO IR)."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    except ImportError:
        raise ModelLoadError("int8: the nncf package is not installed (pip install 'fastsd[int8]')") from None
    import openvino as ov
    model = core.read_model(str(unet_path))
    # SmoothQuant off, as in optimum-intel's recipe for diffusion UNets
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1))
    if recipe == "hybrid":
        # the MatMuls with a weight (a constant input): their weights go int8, their activations stay
        matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"
                   and any(i.get_source_output().get_node().get_type_name() in ("Constant", "Convert")
                           for i in op.inputs())]
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        ignored = nncf.IgnoredScope(names=matmuls, patterns=list(keep), validate=False)
    else:
        ignored = nncf.IgnoredScope(patterns=list(keep), validate=False)
    quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds), ignored_scope=ignored, advanced_parameters=advanced)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".partial.xml")
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(out.with_suffix(".bin"))
    tmp.replace(out)  # the .xml last: its presence says the pair is complete
    return out


def int8_unet(backend, model, unet_path: Path, prompts_file: str | None, recipe: str) -> Path:
    """The int8 UNet of this export (quantized now when the cache has none for these prompts and recipe)."""
    if recipe not in RECIPES:
        raise InvalidParameter("int8", recipe, ", ".join(RECIPES))
    prompts = read_prompts(prompts_file)
    stat = Path(unet_path).stat()
    key = hashlib.sha256(json.dumps([str(Path(unet_path).resolve()), stat.st_size, stat.st_mtime_ns, prompts,
                                     recipe, keep_patterns(model), CALIBRATION_STEPS, calibration_size(model)]).encode()).hexdigest()[:16]
    out = backend.cache_root / "int8" / key / "unet.xml"
    if out.is_file():
        return out
    log.info("openvino: quantizing the UNet to int8 (%s), calibrated on %d prompts x %d steps at %dpx",
             recipe, len(prompts), CALIBRATION_STEPS, calibration_size(model))
    feeds = calibration_inputs(model, backend.calibration_graph("text_encoder"), backend.calibration_graph("unet"),
                               prompts)
    return quantize(backend.core, unet_path, feeds, recipe, out, keep_patterns(model))
