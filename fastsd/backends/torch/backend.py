"""PyTorch eager backend: diffusers' modules on a device and dtype, with fastsd's attention kernels."""
from __future__ import annotations

import logging

import torch

from fastsd import kernels

from ...errors import InvalidParameter
from ...lora import LoraError, ModuleWeights
from ...step_cache import StepCache
from . import recipe

log = logging.getLogger("fastsd")


class TorchBackend:
    name = "torch"
    takes_timestep_cond = True  # an LCM-distilled UNet's guidance embedding (eager UNet only)

    def __init__(self, model, config):
        self.device = torch.device(config.device)
        prec = recipe.precision(config, self.device)
        self.dtype, self.vae_dtype, self.text_dtype, self.cpu_recipe = prec.denoiser, prec.vae, prec.text, prec.cpu_recipe
        self.text_encoder = model.text_encoder.to(self.device, self.text_dtype)
        self.unet_module = model.unet.to(self.device, self.dtype)
        self.vae = model.vae.to(self.device, self.vae_dtype)
        if model.safety_checker is not None and config.safety_checker:
            model.safety_checker.to(self.device)
        done = recipe.install([self.unet_module], self.vae, config, self.device, prec, fuse_qkv=True)
        self.attention = done.attention
        self.applied: list[str] = [*done.fused[0]] if done.fused else []
        if done.channels_last:
            self.applied.append("channels_last")
        if self.cpu_recipe:
            self.applied.append("cpu_recipe(text encoder fp32, VAE channels_last)")
        self.frozen_weights = False  # compiled with inductor freezing: weights became graph constants
        self.lora_switching = config.lora_switching
        self.ran = False
        if config.compile:
            self._compile()
        self.graphs = self._cuda_graphs() if config.cuda_graphs else None
        self.step_cache = None
        if config.cache_interval > 1:
            self.step_cache = StepCache(self.unet_module, config.cache_interval)
            self.applied.append(f"step_cache(interval {config.cache_interval})")
        self.memory_switches = (config.attention_slicing, config.vae_tiling)
        self.memory_plan: tuple[bool | int, bool] = (False, False)  # what is applied now

    def _cuda_graphs(self):
        ok, why = kernels.cuda_graphs_available(self.device)
        if not ok:
            log.warning("cuda_graphs off: %s", why)
            return None
        self.applied.append("cuda_graphs")
        return kernels.CUDAGraphRunner(self.unet_module, device=self.device)

    def prepare(self, batch: int, height: int, width: int, guided: bool) -> None:
        """Before a call: attention slicing and VAE tiling as the flags say, or ("auto") as the memory
        estimate for this batch and size says. Changes modules only when the plan changes."""
        if self.step_cache is not None:
            self.step_cache.reset()  # a new generation: its first step runs the whole UNet
        slicing_flag, tiling_flag = self.memory_switches
        plan = None
        if "auto" in self.memory_switches:
            flash = self.attention in ("triton", "xformers") or (self.attention == "sdpa" and self.device.type == "cuda")
            plan = kernels.plan_memory(self.unet_module.config, self.vae.config, batch, height, width, self.dtype,
                                       self.device, cfg_batch_factor=2 if guided else 1, flash_backend=flash)
        slicing = plan.attention_slicing if slicing_flag == "auto" else slicing_flag == "on"
        tiling = plan.vae_tiling if tiling_flag == "auto" else tiling_flag == "on"
        if (slicing, tiling) == self.memory_plan:
            return
        for p in kernels.installed_processors(self.unet_module):
            p.set_slice_size(None)
        if not tiling:
            self.vae.disable_tiling()
        done = kernels.apply_memory_plan(self.unet_module, self.vae, kernels.MemoryPlan(
            slicing, tiling, 0, plan.reason if plan else "flags"))
        log.info("memory for %dx%d batch %d: %s%s", width, height, batch, ", ".join(done) or "no slicing, no tiling",
                 f" ({plan.reason})" if plan else "")
        self.memory_plan = (slicing, tiling)

    def _compile(self):
        """torch.compile the UNet; on the CPU inductor freezes the weights (constant-folds them and
        pre-packs them for oneDNN). Measured on 2 Zen 4 cores, bf16: UNet step -12% CPU time after
        1-4 minutes of compile per shape; the VAE decoder gained nothing, so it stays eager."""
        if self.device.type == "cpu":
            import torch._inductor.config as inductor_config
            # freezing folds the weights into the graph, so a LoRA switch after the first call would not
            # reach it: an engine built for switching keeps them graph inputs (written in place)
            inductor_config.freezing = not self.lora_switching
            self.frozen_weights = not self.lora_switching
        self.unet_module = torch.compile(self.unet_module)
        self.applied.append("compile" + ("(freezing)" if self.device.type == "cpu" else ""))

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = None  # SD's text encoders take no attention mask (use_attention_mask is unset)
        return self.text_encoder(input_ids.to(self.device), attention_mask=mask)[0]

    def lora_weights(self):
        """The weights LoRA sets are fused into (fastsd.lora): UNet and text encoder, written in place."""
        return ModuleWeights({"unet": getattr(self.unet_module, "_orig_mod", self.unet_module),
                              "text_encoder": self.text_encoder}, check_write=self._check_weights_writable)

    def _check_weights_writable(self, names) -> None:
        if self.frozen_weights and self.ran and any(n.startswith("unet.") for n in names):
            raise LoraError("lora: this UNet was compiled with weight freezing (--compile on the CPU) and has run, so "
                            "its weights are constants of the compiled graph; set the LoRAs before the first "
                            "generation, or build the engine with lora_switching=True")

    @torch.inference_mode()
    def unet(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
             timestep_cond: torch.Tensor | None = None, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """timestep_cond: an LCM-distilled UNet's guidance embedding; class_labels: the x4 upscaler's noise level per
        image (its UNet's class embedding). Both run the eager UNet."""
        self.ran = True
        if timestep_cond is not None or class_labels is not None:
            if self.step_cache is not None or self.graphs is not None:
                raise InvalidParameter("model", "an LCM-distilled UNet (time_cond_proj_dim) or the x4 upscaler "
                                       "(class labels)", "a UNet without a guidance embedding or class labels with "
                                       "step caching or CUDA graphs")
            extra = {}
            if timestep_cond is not None:
                extra["timestep_cond"] = timestep_cond.to(self.dtype)
            if class_labels is not None:
                extra["class_labels"] = class_labels.to(self.device)
            return self.unet_module(sample.to(self.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(
                self.dtype), **extra, return_dict=False)[0]
        if self.step_cache is not None:
            return self.step_cache(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype))
        if self.graphs is not None:
            return self.graphs(sample.to(self.dtype), timestep, encoder_hidden_states.to(self.dtype))
        return self.unet_module(sample.to(self.dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(
            self.dtype), return_dict=False)[0]

    @torch.inference_mode()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> the encoder's latent_parameters (mean and log-variance, [B, 8, h, w]), the
        output of the export's vae_encoder graph; the engine samples from them with its own generators. A tiny
        VAE (AutoencoderTiny) gives its latents themselves ([B, 4, h, w]): nothing to sample."""
        out = self.vae.encode(image.to(self.device, self.vae_dtype))
        return out.latent_dist.parameters if hasattr(out, "latent_dist") else out.latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae_dtype), return_dict=False)[0]

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "vae_dtype": str(self.vae_dtype).replace("torch.", ""),
                "text_encoder_dtype": str(self.text_dtype).replace("torch.", ""), "attention": self.attention,
                "applied": self.applied + [name for name, on in zip(("attention_slicing", "vae_tiling"),
                                                                     self.memory_plan) if on]}
