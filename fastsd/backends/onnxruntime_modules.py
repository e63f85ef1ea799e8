"""ONNX Runtime as module runners for `fastsd.accelerate(pipe, backend="onnxruntime")`: the UNet and VAE
decoder graphs of an export (`fastsd export`, or one accelerate writes from the pipeline) called in place of
the torch modules, with the modules' own signatures. What a graph exported with (sample, timestep,
encoder_hidden_states) cannot take is refused (ControlNet residuals, added_cond_kwargs, timestep_cond,
cross_attention_kwargs, a per-image timestep, a shape outside the export's range, weights that changed
since the export) and runs in torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidParameter, ModelLoadError
from .modules import Refused, extra_inputs, register_module_runner
from .onnxruntime import GPU_PROVIDERS, _Graph, _import_ort, choose_providers

# the config entries that fix a graph's architecture: an export of another model is refused up front
_UNET_KEYS = ("in_channels", "out_channels", "cross_attention_dim", "block_out_channels", "sample_size")
_VAE_KEYS = ("latent_channels", "block_out_channels")


def _fingerprint(module) -> torch.Tensor:
    # the first values of every weight: in-place changes through .data (peft's merge) bump no version counter
    return torch.cat([p.detach().reshape(-1)[:4].float().cpu() for p in module.parameters()])


def _check_config(folder: Path, comp: str, module, keys) -> None:
    f = folder / comp / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError):
        raise ModelLoadError(f"onnx_dir: {folder} has no readable {comp}/config.json (not a fastsd export?)") from None
    for k in keys:
        mine, theirs = module.config.get(k), cfg.get(k)
        if theirs is not None and list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
            raise InvalidParameter("onnx_dir", str(folder), f"an export of this pipeline's model ({comp} {k} is "
                                   f"{theirs} there, {mine} here)")


class _Runner:
    def __init__(self, graph: _Graph, module, what: str):
        self.graph, self.module, self.what = graph, module, what
        self._weights = None

    def _check_weights(self) -> None:
        now = _fingerprint(self.module)
        if self._weights is None:  # taken at the first call, after accelerate converted the module
            self._weights = now
        elif not torch.equal(now, self._weights):
            raise Refused(f"the torch {self.what}'s weights changed since the export (a LoRA fused into them?); "
                          "call fastsd.accelerate again to re-export")

    def _run(self, feed: dict, batched: tuple) -> torch.Tensor:
        try:
            out = self.graph.run(feed, batched)[0]
        except InvalidParameter as e:  # a shape outside the export's range
            raise Refused(str(e)) from None
        return torch.from_numpy(np.ascontiguousarray(out))

    def describe(self) -> dict:
        return {"graph": str(self.graph.path), "providers": self.graph.providers}


class UNetRunner(_Runner):
    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        extra = extra_inputs(kwargs)
        if extra:
            raise Refused(f"the graph takes sample, timestep and encoder_hidden_states only, not {', '.join(extra)}")
        t = torch.as_tensor(timestep)
        if t.numel() > 1 and not bool((t == t.reshape(-1)[0]).all()):
            raise Refused("a different timestep per image (the graph takes one)")
        self._check_weights()
        g = self.graph
        ts = np.asarray(float(t.reshape(-1)[0]), dtype=g.dtype("timestep"))
        if g.rank("timestep") == 1:
            ts = ts.reshape(1)
        feed = {"sample": sample.detach().float().cpu().numpy().astype(g.dtype("sample"), copy=False),
                "timestep": ts,
                "encoder_hidden_states": encoder_hidden_states.detach().float().cpu().numpy().astype(
                    g.dtype("encoder_hidden_states"), copy=False)}
        return self._run(feed, ("sample", "encoder_hidden_states")).to(sample.device)


class VaeDecoderRunner(_Runner):
    def __call__(self, latents, *args, **kwargs):
        # generator: decoding is deterministic; anything else is an input the graph has no place for
        extra = extra_inputs({k: v for k, v in kwargs.items() if k != "generator"}) + [
            f"positional argument {i + 2}" for i, a in enumerate(args) if a is not None]
        if extra:
            raise Refused(f"the graph takes the latents only, not {', '.join(extra)}")
        self._check_weights()
        g = self.graph
        x = latents.detach().float().cpu().numpy().astype(g.dtype("latent_sample"), copy=False)
        return self._run({"latent_sample": x}, ("latent_sample",)).to(latents.device)


@register_module_runner("onnxruntime")
def onnxruntime_runners(pipe, config, *, onnx_dir) -> dict:
    """{"unet": UNetRunner, "vae_decoder": VaeDecoderRunner} over the graphs in `onnx_dir`."""
    ort = _import_ort()
    folder = Path(onnx_dir)
    info = {}
    if (folder / "fastsd_export.json").is_file():
        info = json.loads((folder / "fastsd_export.json").read_text())
    exported = info.get("dtype", "fp32")
    if config.dtype != exported:
        raise InvalidParameter("dtype", config.dtype, f"{exported} (the dtype {folder} was exported in)")
    providers = choose_providers(ort, config.device)
    gpu = any(p in GPU_PROVIDERS for p in providers)
    runners = {}
    for comp, module, keys, cls, what in (("unet", pipe.unet, _UNET_KEYS, UNetRunner, "UNet"),
                                          ("vae_decoder", pipe.vae, _VAE_KEYS, VaeDecoderRunner, "VAE")):
        path = folder / comp / "model.onnx"
        if not path.is_file():
            raise ModelLoadError(f"onnx_dir: {folder} has no {comp} graph ({path})")
        _check_config(folder, comp, module, keys)
        gpu_path = folder / comp / "model.gpu.onnx"
        graph = _Graph(ort, comp, gpu_path if gpu and gpu_path.is_file() else path, providers,
                       [{} for _ in providers], torch.get_num_threads())
        runners[comp] = cls(graph, module, what)
    return runners


onnxruntime_runners.needs_onnx_export = True  # accelerate exports the pipeline when no onnx_dir is given
