"""OpenVINO as module runners for `fastsd.accelerate(pipe, backend="openvino")` (and `profile="fast"` on a
CPU with AMX): the pipeline's UNet and VAE decoder run as OpenVINO compiled models in place of the torch
modules, with the modules' own signatures.

Everything OpenVINO-specific is the openvino backend's (openvino.py): the conversion (the pipeline's ONNX
export, written once per weights into the OpenVINO cache folder), the static-shape compiles (one per input
shape, kept in memory and in OpenVINO's disk cache) and the precision mapping (fp32 -> f32, bf16 -> bf16
where the CPU has native bf16). What a graph exported with (sample, timestep, encoder_hidden_states) cannot
take is refused (modules.py: ControlNet residuals, added_cond_kwargs, cross_attention_kwargs such as a LoRA
scale, a per-image timestep, weights changed since the export) and runs in torch. The VAE encoder
(image-to-image, inpainting) stays in torch, as with the ONNX Runtime runners."""
from __future__ import annotations

from pathlib import Path

import torch

from ...errors import InvalidParameter, ModelLoadError
from ..runners import (UNET_KEYS, VAE_KEYS, Refused, WeightsWatch, check_export_config, check_plain_decode,
                       export_dtype, pipeline_model, plain_unet_timestep)
from .backend import (StaticGraph, cache_root, check_config, compile_properties, export_for_openvino,
                      import_openvino, inference_precision, native_bf16, run_decoder, run_unet)

COMPONENTS = ("unet", "vae_decoder")


class _Runner:
    def __init__(self, graph: StaticGraph, module, what: str, describe: dict):
        self.graph, self.module, self.what = graph, module, what
        self.weights = WeightsWatch(module, what)
        self._describe = describe

    def _refusing_shapes(self, fn, *args) -> torch.Tensor:
        try:
            return fn(self.graph, *args)
        except InvalidParameter as e:  # a shape the graph cannot be reshaped to
            raise Refused(str(e)) from None

    def describe(self) -> dict:
        return {"graph": str(self.graph.path), **self._describe, "compiled_shapes": self.graph.compiles}


class UNetRunner(_Runner):
    def __call__(self, sample, timestep, encoder_hidden_states, **kwargs):
        t = plain_unet_timestep(timestep, kwargs)
        self.weights.check()
        return self._refusing_shapes(run_unet, sample, t, encoder_hidden_states).to(sample.device)


class VaeDecoderRunner(_Runner):
    def __call__(self, latents, *args, **kwargs):
        check_plain_decode(args, kwargs)
        self.weights.check()
        return self._refusing_shapes(run_decoder, latents).to(latents.device)


def module_runners(pipe, config, *, onnx_dir=None) -> dict:
    """{"unet": UNetRunner, "vae_decoder": VaeDecoderRunner}, compiled from the FP32 export in `onnx_dir`,
    or from the pipeline exported now into the OpenVINO cache folder (reused while its weights are the same)."""
    ov = import_openvino()
    check_config(config, "fastsd.accelerate with the openvino backend")
    if onnx_dir is None:
        folder = export_for_openvino(pipeline_model(pipe), COMPONENTS)
    else:
        folder = Path(onnx_dir)
        if export_dtype(folder) != "fp32":
            raise InvalidParameter("onnx_dir", str(folder), "an fp32 export (OpenVINO picks its precision itself "
                                   "from the dtype; export with --dtype fp32)")
    core = ov.Core()
    precision = inference_precision(core, config.dtype)
    threads = torch.get_num_threads()
    cache_dir = cache_root() / "compiled"
    props = compile_properties(cache_dir, precision, threads)
    about = {"precision": precision, "native_bf16": native_bf16(core), "threads": threads,
             "cache_dir": str(cache_dir), "openvino": ov.__version__}
    runners = {}
    for comp, module, keys, cls, what, static in (
            ("unet", pipe.unet, UNET_KEYS, UNetRunner, "UNet", ("sample", "encoder_hidden_states")),
            ("vae_decoder", pipe.vae, VAE_KEYS, VaeDecoderRunner, "VAE", ("latent_sample",))):
        path = folder / comp / "model.onnx"
        if not path.is_file():
            raise ModelLoadError(f"onnx_dir: {folder} has no {comp} graph ({path})")
        check_export_config(folder, comp, module, keys)
        runners[comp] = cls(StaticGraph(core, comp, path, props, static), module, what, about)
    return runners
