"""ONNX Runtime as module runners for `fastsd.accelerate(pipe, backend="onnxruntime")`: the UNet and VAE
decoder graphs of an export (`fastsd export`, or one accelerate writes from the pipeline) called in place of
the torch modules, with the modules' own signatures. What a graph exported with (sample, timestep,
encoder_hidden_states) cannot take is refused (ControlNet residuals, added_cond_kwargs, timestep_cond,
cross_attention_kwargs, a per-image timestep, a shape outside the export's range, weights that changed
since the export) and runs in torch."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ...errors import InvalidParameter, ModelLoadError
from ..runners import (UNET_KEYS, VAE_KEYS, Refused, WeightsWatch, check_export_config, check_plain_decode,
                       pipeline_model, plain_unet_timestep)
from .backend import (GPU_PROVIDERS, _Graph, _import_ort, choose_providers, is_optimized, session_providers,
                      trt_profiles)

log = logging.getLogger("fastsd")


class _Runner:
    def __init__(self, graph: _Graph, module, what: str):
        self.graph, self.module, self.what = graph, module, what
        self.weights = WeightsWatch(module, what)

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
        t = plain_unet_timestep(timestep, kwargs)
        self.weights.check()
        g = self.graph
        ts = np.asarray(t, dtype=g.dtype("timestep"))
        if g.rank("timestep") == 1:
            ts = ts.reshape(1)
        feed = {"sample": sample.detach().float().cpu().numpy().astype(g.dtype("sample"), copy=False),
                "timestep": ts,
                "encoder_hidden_states": encoder_hidden_states.detach().float().cpu().numpy().astype(
                    g.dtype("encoder_hidden_states"), copy=False)}
        return self._run(feed, ("sample", "encoder_hidden_states")).to(sample.device)


class VaeDecoderRunner(_Runner):
    def __call__(self, latents, *args, **kwargs):
        check_plain_decode(args, kwargs)
        self.weights.check()
        g = self.graph
        x = latents.detach().float().cpu().numpy().astype(g.dtype("latent_sample"), copy=False)
        return self._run({"latent_sample": x}, ("latent_sample",)).to(latents.device)


def module_runners(pipe, config, *, onnx_dir=None) -> dict:
    """{"unet": UNetRunner, "vae_decoder": VaeDecoderRunner} over the graphs in `onnx_dir`, or, without one,
    over the pipeline's UNet and VAE decoder exported now to a temporary folder (in `config.dtype`)."""
    ort = _import_ort()
    if onnx_dir is None:
        onnx_dir = _export_pipeline(pipe, config)
    folder = Path(onnx_dir)
    info = {}
    if (folder / "fastsd_export.json").is_file():
        info = json.loads((folder / "fastsd_export.json").read_text())
    exported = info.get("dtype", "fp32")
    if config.dtype != exported:
        raise InvalidParameter("dtype", config.dtype, f"{exported} (the dtype {folder} was exported in)")
    providers = choose_providers(ort, config.device)
    gpu = any(p in GPU_PROVIDERS for p in providers)
    profiles = trt_profiles(folder)
    runners = {}
    for comp, module, keys, cls, what in (("unet", pipe.unet, UNET_KEYS, UNetRunner, "UNet"),
                                          ("vae_decoder", pipe.vae, VAE_KEYS, VaeDecoderRunner, "VAE")):
        path = folder / comp / "model.onnx"
        if not path.is_file():
            raise ModelLoadError(f"onnx_dir: {folder} has no {comp} graph ({path})")
        check_export_config(folder, comp, module, keys)
        gpu_path = folder / comp / "model.gpu.onnx"
        # the backend's providers and options (cuda:N's device id, TensorRT's cache and profiles), built alike
        names, options = session_providers(providers, comp, config.device, export_dtype=exported, folder=folder,
                                           profile=profiles.get(comp),
                                           optimized=is_optimized(info, comp, {"gpu": gpu_path.is_file()}))
        graph = _Graph(ort, comp, gpu_path if gpu and gpu_path.is_file() else path, names, options,
                       torch.get_num_threads())
        runners[comp] = cls(graph, module, what)
    return runners



def _export_pipeline(pipe, config) -> str:
    """The pipeline's UNet and VAE decoder as ONNX graphs in a temporary folder (checked against torch by
    the exporter)."""
    import tempfile

    from fastsd.export import export_onnx  # the exporter imports onnx: only when a pipeline is exported
    folder = tempfile.mkdtemp(prefix="fastsd-accelerate-onnx-")
    export_onnx(pipeline_model(pipe), folder, dtype=config.dtype, components=("unet", "vae_decoder"))
    log.info("fastsd.accelerate: exported the UNet and VAE decoder to %s (pass onnx_dir= to reuse it)", folder)
    return folder
