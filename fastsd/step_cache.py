"""Step caching, training-free (the method of DeepCache, Ma et al., CVPR 2024): neighbouring denoising steps
have nearly the same deep UNet features, so every `interval`-th step runs the whole UNet and keeps the
feature map that enters the last up block's shallow layers; the steps between run only the shallowest
layers (conv_in, the first layer of the first down block, the last up block's last layers, conv_out) on
top of that cached feature.

With interval N a step costs about (1 + (N-1) * shallow share) / N of a full step; the shallow layers are
roughly a tenth of the SD UNet's work at 512x512 (they include two 4096-token attention layers).
The image moves away from the uncached one: `fastsd verify --cache-interval 1,2,3` says how far.
Written here rather than taken from the `deepcache` package (0.1.1, 2023, unmaintained), which patches
diffusers' pipeline __call__, while fastsd runs its own loop."""
from __future__ import annotations

import torch

from .errors import InvalidParameter


def check_interval(value) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or not 1 <= int(text) <= 50:
        raise InvalidParameter("cache_interval", value, "a whole number in 1..50 (1: no step caching)")
    return int(text)


def _out(x):
    return x[0] if isinstance(x, tuple) else getattr(x, "sample", x)


class StepCache:
    """Wraps a diffusers UNet2DConditionModel: call it as the UNet (sample, timestep, encoder_hidden_states)
    -> noise prediction. `reset()` before each generation (the engine's backend does, in prepare)."""

    def __init__(self, unet, interval: int):
        self.unet, self.interval = unet, check_interval(interval)
        cfg = unet.config
        unsupported = [k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type",
                                   "time_cond_proj_dim") if cfg.get(k) is not None]
        if cfg.get("center_input_sample") or unsupported or len(unet.up_blocks) < 2:
            raise InvalidParameter("cache_interval", interval, "1 for this UNet (step caching supports the SD 1.x/2.x "
                                   f"UNet; this one has {', '.join(unsupported) or 'another layout'})")
        self.down, self.up = unet.down_blocks[0], unet.up_blocks[-1]
        self.n_up = len(self.up.resnets)
        # partial steps run down layer 0 and the up layers that consume its skips (the last two): the cached
        # feature is what enters up layer n_up - 2
        self.entry = self.n_up - 2
        source = unet.up_blocks[-2] if self.entry == 0 else (
            self.up.attentions[self.entry - 1] if getattr(self.up, "attentions", None) else self.up.resnets[self.entry - 1])
        source.register_forward_hook(self._keep)
        self.capturing = False
        self.feature = None
        self.key = None
        self.calls = 0
        self.full_calls = 0

    def _keep(self, module, args, output):
        if self.capturing:
            self.feature = _out(output)

    def reset(self):
        self.calls, self.feature, self.key = 0, None, None

    def __call__(self, sample, timestep, encoder_hidden_states):
        key = (tuple(sample.shape), tuple(encoder_hidden_states.shape), sample.dtype)
        full = self.calls % self.interval == 0 or self.feature is None or key != self.key
        self.calls += 1
        if full:
            self.full_calls += 1
            self.capturing = self.interval > 1
            try:
                out = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
            finally:
                self.capturing = False
            self.key = key
            if self.interval > 1:
                self.calls = 1  # the count restarts at each full step (a shape change forces one early)
            return out
        return self._shallow(sample, timestep, encoder_hidden_states)

    def _layer(self, block, i, h, temb, ehs):
        h = block.resnets[i](h, temb)
        if getattr(block, "attentions", None):
            h = block.attentions[i](h, encoder_hidden_states=ehs, return_dict=False)[0]
        return h

    def _shallow(self, sample, timestep, ehs):
        """The UNet's forward (diffusers' UNet2DConditionModel.forward, SD path) cut to the shallow layers."""
        u = self.unet
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        h = u.conv_in(sample)
        skips = [h, self._layer(self.down, 0, h, emb, ehs)]
        h = self.feature
        for j in range(self.entry, self.n_up):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._layer(self.up, j, h, emb, ehs)
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h)
