"""The four graphs of an SD export: the PyTorch module each one traces, its input and output names
(those of ONNX Runtime's and Optimum's SD pipelines), its dynamic axes, and its input shapes at the
min/opt/max points of a shape range (for parity inputs and TensorRT profiles)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidParameter

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
SEQUENCE = 77  # CLIP's context: prompts are always padded to it


# -- the modules traced ------------------------------------------------------------------------------
class TextEncoderGraph(torch.nn.Module):
    """int32 input_ids (diffusers' ONNX pipeline hard-casts to int32) -> (last_hidden_state, pooler_output)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        out = self.text_encoder(input_ids.to(torch.int64), return_dict=False)
        return out[0], out[1]


class UNetGraph(torch.nn.Module):
    """(sample, timestep [1] float32, encoder_hidden_states[, class_labels int64 [B]]) -> out_sample (the noise
    prediction). class_labels: the x4 upscaler's noise level per image (diffusers' ONNX upscale pipeline's name);
    sample has the UNet's own input channels (4, 9 inpainting, 5 depth, 7 upscaler)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                         return_dict=False)[0]


class VaeDecoderGraph(torch.nn.Module):
    """latent_sample (already divided by the scaling factor) -> sample, the image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """sample (image in [-1, 1]) -> latent_parameters: mean and log-variance, [B, 2*latent_channels, h, w]; for a
    tiny VAE (AutoencoderTiny), whose encoder gives latents and no distribution, the latents [B, latent_channels,
    h, w] (the engine tells them apart by their channels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        h = self.vae.encoder(sample)
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        return h


# -- shapes --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    def points(self):
        return {"min": self.min, "opt": self.opt, "max": self.max}


def parse_range(name: str, text, *, low: int, high: int, multiple: int = 1) -> Range:
    """'MIN:OPT:MAX' or a single 'N' (all three the same), each in [low, high] and a multiple of `multiple`."""
    if isinstance(text, Range):
        return text
    allowed = f"MIN:OPT:MAX or N, integers in [{low}, {high}]" + (f", multiples of {multiple}" if multiple > 1 else "") \
        + ", MIN <= OPT <= MAX"
    parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise InvalidParameter(name, text, allowed) from None
    if not (low <= lo <= opt <= hi <= high) or any(v % multiple for v in (lo, opt, hi)):
        raise InvalidParameter(name, text, allowed)
    return Range(lo, opt, hi)


@dataclass(frozen=True)
class Shapes:
    """Images per call (batch) and image size in pixels, as ranges; static pins everything at opt."""
    batch: Range
    resolution: Range
    static: bool = False
    sequence: int = SEQUENCE

    def at(self, point: str) -> tuple[int, int]:
        pick = "opt" if self.static else point
        return getattr(self.batch, pick), getattr(self.resolution, pick)

    def to_dict(self) -> dict:
        return {"batch": self.batch.points(), "resolution": self.resolution.points(), "static": self.static,
                "sequence": self.sequence}


@dataclass(frozen=True)
class ModelDims:
    """What the graphs' shapes depend on, read from the model's configs."""
    vocab_size: int
    eos_token_id: int
    hidden_size: int  # text encoder width = UNet cross-attention dim
    in_channels: int  # UNet latent channels
    latent_channels: int  # VAE latent channels
    vae_scale_factor: int
    scaling_factor: float
    class_labels: bool = False  # the UNet takes class labels (the x4 upscaler's noise level)

    @classmethod
    def of(cls, model) -> "ModelDims":
        te = model.text_encoder.config if model.text_encoder is not None else None  # None: no text graph
        vocab = int(te.vocab_size) if te is not None else 1
        eos = getattr(te, "eos_token_id", None)
        return cls(vocab, int(eos if eos is not None and eos < vocab else vocab - 1),
                   int(model.unet.config.cross_attention_dim), int(model.unet.config.in_channels),
                   int(model.vae.config.latent_channels), int(model.vae_scale_factor),
                   float(model.vae.config.scaling_factor),
                   getattr(model.unet.config, "num_class_embeds", None) is not None)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict

    def module(self, model) -> torch.nn.Module:
        return {"text_encoder": lambda: TextEncoderGraph(model.text_encoder), "unet": lambda: UNetGraph(model.unet),
                "vae_decoder": lambda: VaeDecoderGraph(model.vae),
                "vae_encoder": lambda: VaeEncoderGraph(model.vae)}[self.name]().eval()

    def batch_at(self, shapes: Shapes, point: str) -> int:
        b, _ = shapes.at(point)
        if self.name == "unet":  # classifier-free guidance doubles the UNet batch; without it, min stays b
            return b if point == "min" and not shapes.static else 2 * b
        return b

    def input_shapes(self, dims: ModelDims, shapes: Shapes, point: str) -> dict[str, list[int]]:
        b = self.batch_at(shapes, point)
        _, res = shapes.at(point)
        lat = res // dims.vae_scale_factor
        return {
            "text_encoder": {"input_ids": [b, shapes.sequence]},
            "unet": {"sample": [b, dims.in_channels, lat, lat], "timestep": [1],
                     "encoder_hidden_states": [b, shapes.sequence, dims.hidden_size],
                     **({"class_labels": [b]} if dims.class_labels else {})},
            "vae_decoder": {"latent_sample": [b, dims.latent_channels, lat, lat]},
            "vae_encoder": {"sample": [b, 3, res, res]},
        }[self.name]

    def sample_inputs(self, dims: ModelDims, in_shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded inputs of these shapes, in the ranges the pipeline feeds."""
        g = torch.Generator().manual_seed(seed)
        out = {}
        for name, shape in in_shapes.items():
            if name == "input_ids":
                ids = torch.randint(0, dims.vocab_size, shape, generator=g, dtype=torch.int64)
                ids[:, -1] = dims.eos_token_id
                out[name] = ids.to(torch.int32)
            elif name == "timestep":
                out[name] = torch.tensor([981.0]).expand(shape).contiguous()
            elif name == "class_labels":  # noise levels the upscaler is run at (0..350)
                out[name] = torch.randint(0, 351, shape, generator=g, dtype=torch.int64)
            elif name == "latent_sample":
                out[name] = torch.randn(shape, generator=g) / dims.scaling_factor
            elif self.name == "vae_encoder":
                out[name] = torch.rand(shape, generator=g) * 2 - 1
            else:
                out[name] = torch.randn(shape, generator=g)
        return out


def graph_specs(static: bool = False, class_labels: bool = False) -> dict[str, GraphSpec]:
    """class_labels: the UNet graph takes them (ModelDims.class_labels: the x4 upscaler)."""
    def axes(d):
        return {} if static else d
    labels = ("class_labels",) if class_labels else ()
    return {
        "text_encoder": GraphSpec("text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output"), axes({
            "input_ids": {0: "batch", 1: "sequence"}, "last_hidden_state": {0: "batch", 1: "sequence"},
            "pooler_output": {0: "batch"}})),
        "unet": GraphSpec("unet", ("sample", "timestep", "encoder_hidden_states", *labels), ("out_sample",), axes({
            "sample": {0: "batch", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch", 1: "sequence"},
            "out_sample": {0: "batch", 2: "height", 3: "width"}, **{k: {0: "batch"} for k in labels}})),
        "vae_decoder": GraphSpec("vae_decoder", ("latent_sample",), ("sample",), axes({
            "latent_sample": {0: "batch", 2: "height", 3: "width"},
            "sample": {0: "batch", 2: "image_height", 3: "image_width"}})),
        "vae_encoder": GraphSpec("vae_encoder", ("sample",), ("latent_parameters",), axes({
            "sample": {0: "batch", 2: "image_height", 3: "image_width"},
            "latent_parameters": {0: "batch", 2: "height", 3: "width"}})),
    }


def trt_profiles(dims: ModelDims, shapes: Shapes, components) -> dict:
    """{graph: {input: {"min": [...], "opt": [...], "max": [...]}}} for TensorRT optimization profiles."""
    specs = graph_specs(shapes.static, dims.class_labels)
    out = {}
    for comp in components:
        spec = specs[comp]
        pts = {p: spec.input_shapes(dims, shapes, p) for p in ("min", "opt", "max")}
        out[comp] = {name: {p: pts[p][name] for p in pts} for name in spec.inputs}
    return out
