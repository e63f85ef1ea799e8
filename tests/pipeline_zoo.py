"""Every diffusers pipeline class in fastsd.accelerate's scope, built from tiny random-weight components (no
hub: configs only), with the arguments of one small call. `PIPELINES[name]` is (components, call): two
functions, so that each test builds fresh modules. Tiny configs follow the SD family's structure (the TINY
preset: a 2-block UNet, a 4-block VAE, a 32-wide CLIP text encoder); SDXL adds a second text encoder and
the text_time embedding; the x2 latent upscaler and x4 upscaler keep their own block types."""
import inspect

import diffusers
import numpy as np
import torch
from PIL import Image
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

from fastsd.presets import TINY
from fastsd.tokenizer import byte_level_clip_tokenizer

_TOKENIZER = []


def tokenizer():
    if not _TOKENIZER:
        _TOKENIZER.append(byte_level_clip_tokenizer())
    return _TOKENIZER[0]


def unet(**over):
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**{**TINY.unet, **over}).eval()


def vae(**over):
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(**{**TINY.vae, **over}).eval()


def text_encoder(projection: bool = False):
    torch.manual_seed(2)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**TINY.text_encoder)).eval()


def image_encoder():
    torch.manual_seed(3)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=4,
        intermediate_size=37)).eval()


def feature_extractor():
    return CLIPImageProcessor(crop_size=32, size=32)


def controlnet(xl: bool = False, union: bool = False):
    torch.manual_seed(4)
    kw = dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=16,
              conditioning_embedding_out_channels=(16, 16, 16, 16), cross_attention_dim=64 if xl else 32)
    if xl:
        kw.update(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    if union:
        return diffusers.ControlNetUnionModel(**kw, num_trans_channel=32, num_trans_head=2,
                                              num_proj_channel=32).eval()
    cn = diffusers.ControlNetModel(**kw).eval()
    with torch.no_grad():  # zero convolutions by design; random here so that the residuals matter
        for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    return cn


def adapter():
    torch.manual_seed(5)
    return diffusers.T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=8,
                                adapter_type="full_adapter").eval()


def pndm():
    return diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True)


def ddim(**kw):
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, **kw)


XL_UNET = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
               cross_attention_dim=64)


def sd(**unet_over):
    return dict(vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(), unet=unet(**unet_over),
                scheduler=pndm(), safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False)


def sdxl(**unet_over):
    return dict(vae=vae(), text_encoder=text_encoder(), text_encoder_2=text_encoder(projection=True),
                tokenizer=tokenizer(), tokenizer_2=tokenizer(), unet=unet(**{**XL_UNET, **unet_over}),
                scheduler=ddim(), image_encoder=None, feature_extractor=None, requires_aesthetics_score=False)


def image(seed: int = 3, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def mask(size: int = 64) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return Image.fromarray(m, "L")


TEXT = dict(prompt="a red circle", negative_prompt="blue", num_inference_steps=2, height=64, width=64)
I2I = dict(prompt="a red circle", image=image(), strength=0.9, num_inference_steps=3)
INPAINT = dict(prompt="a red circle", image=image(), mask_image=mask(), strength=1.0, num_inference_steps=2,
               height=64, width=64)
CN = dict(TEXT, image=image(4))
PAG = dict(pag_scale=3.0)


def _unclip_parts():
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    return dict(image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=32),
                image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
                unet=unet(class_embed_type="projection", projection_class_embeddings_input_dim=64),
                scheduler=ddim(), vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer())


def _unclip():
    torch.manual_seed(6)
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=16, embedding_dim=32, num_layers=1)
    prior_scheduler = diffusers.DDPMScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                              num_train_timesteps=1000, clip_sample=True, clip_sample_range=5.0,
                                              beta_schedule="squaredcos_cap_v2")
    return dict(_unclip_parts(), prior_tokenizer=tokenizer(), prior_text_encoder=text_encoder(projection=True),
                prior=prior, prior_scheduler=prior_scheduler)


def _latent_upscaler():
    torch.manual_seed(0)
    u = diffusers.UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D")).eval()
    return dict(unet=u, vae=vae(), text_encoder=text_encoder(), tokenizer=tokenizer(),
                scheduler=diffusers.EulerDiscreteScheduler(prediction_type="sample"))


def _upscaler():
    torch.manual_seed(0)
    u = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, use_linear_projection=True, only_cross_attention=(True, True, False),
        num_class_embeds=100).eval()
    three = dict(block_out_channels=(16, 16, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3)
    return dict(unet=u, vae=vae(**three), text_encoder=text_encoder(), tokenizer=tokenizer(),
                low_res_scheduler=diffusers.DDPMScheduler(), scheduler=ddim(prediction_type="v_prediction"),
                max_noise_level=350, safety_checker=None, feature_extractor=None, watermarker=None)


def _marigold(prediction_type: str, out: int = 4):
    parts = dict(unet=unet(in_channels=4 + out, out_channels=out), vae=vae(), text_encoder=text_encoder(),
                 tokenizer=tokenizer(), scheduler=ddim(prediction_type="v_prediction"),
                 prediction_type=prediction_type, default_denoising_steps=1, default_processing_resolution=64)
    if prediction_type == "depth":
        parts.update(scale_invariant=True, shift_invariant=True)
    return parts


MARIGOLD = dict(image=image(), num_inference_steps=1, processing_resolution=64)

# name -> (components, call arguments)
PIPELINES = {
    "StableDiffusionPipeline": (sd, TEXT),
    "StableDiffusionImg2ImgPipeline": (sd, I2I),
    "StableDiffusionInpaintPipeline": (lambda: sd(in_channels=9), INPAINT),
    "StableDiffusionInstructPix2PixPipeline": (lambda: sd(in_channels=8), dict(I2I, strength=None)),
    "StableDiffusionDepth2ImgPipeline": (lambda: {**sd(in_channels=5), "depth_estimator": None},
                                         dict(I2I, depth_map=torch.rand(1, 64, 64, generator=torch.Generator()
                                                                        .manual_seed(7)))),
    "StableDiffusionImageVariationPipeline": (lambda: {**sd(), "image_encoder": image_encoder(),
                                                       "feature_extractor": feature_extractor()},
                                              dict(image=image(), num_inference_steps=2, height=64, width=64)),
    "StableDiffusionLatentUpscalePipeline": (_latent_upscaler, dict(
        prompt="a red circle", num_inference_steps=2,
        image=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8)))),
    "StableDiffusionUpscalePipeline": (_upscaler, dict(prompt="a red circle", image=image(size=16),
                                                       num_inference_steps=2)),
    "StableUnCLIPPipeline": (_unclip, dict(TEXT, prior_num_inference_steps=2)),
    "StableUnCLIPImg2ImgPipeline": (lambda: {**_unclip_parts(), "image_encoder": image_encoder(),
                                             "feature_extractor": feature_extractor()},
                                    dict(prompt="a red circle", image=image(), num_inference_steps=2, height=64,
                                         width=64)),
    "StableDiffusionAdapterPipeline": (lambda: {**sd(), "adapter": adapter()}, dict(TEXT, image=image(5))),
    "StableDiffusionControlNetPipeline": (lambda: {**sd(), "controlnet": controlnet()}, CN),
    "StableDiffusionControlNetImg2ImgPipeline": (lambda: {**sd(), "controlnet": controlnet()},
                                                 dict(I2I, control_image=image(4), height=64, width=64)),
    "StableDiffusionControlNetInpaintPipeline": (lambda: {**sd(), "controlnet": controlnet()},
                                                 dict(INPAINT, control_image=image(4))),
    "StableDiffusionControlNetPAGPipeline": (lambda: {**sd(), "controlnet": controlnet(),
                                                      "pag_applied_layers": ["mid"]}, dict(CN, **PAG)),
    "StableDiffusionControlNetPAGInpaintPipeline": (lambda: {**sd(), "controlnet": controlnet(),
                                                             "pag_applied_layers": ["mid"]},
                                                    dict(INPAINT, control_image=image(4), **PAG)),
    "StableDiffusionPAGPipeline": (lambda: {**sd(), "pag_applied_layers": ["mid"]}, dict(TEXT, **PAG)),
    "StableDiffusionPAGImg2ImgPipeline": (lambda: {**sd(), "pag_applied_layers": ["mid"]}, dict(I2I, **PAG)),
    "StableDiffusionPAGInpaintPipeline": (lambda: {**sd(in_channels=9), "pag_applied_layers": ["mid"]},
                                          dict(INPAINT, **PAG)),
    "LatentConsistencyModelPipeline": (lambda: {**sd(time_cond_proj_dim=32), "scheduler": diffusers.LCMScheduler()},
                                       dict(prompt="a red circle", num_inference_steps=2, height=64, width=64)),
    "LatentConsistencyModelImg2ImgPipeline": (lambda: {**sd(time_cond_proj_dim=32),
                                                       "scheduler": diffusers.LCMScheduler()},
                                              dict(prompt="a red circle", image=image(), num_inference_steps=2,
                                                   strength=0.9)),
    "MarigoldDepthPipeline": (lambda: _marigold("depth"), MARIGOLD),
    "MarigoldNormalsPipeline": (lambda: _marigold("normals"), MARIGOLD),
    "MarigoldIntrinsicsPipeline": (lambda: _marigold("intrinsics", out=8), MARIGOLD),
    "StableDiffusionXLPipeline": (sdxl, TEXT),
    "StableDiffusionXLImg2ImgPipeline": (sdxl, I2I),
    "StableDiffusionXLInpaintPipeline": (sdxl, INPAINT),
    "StableDiffusionXLInstructPix2PixPipeline": (lambda: sdxl(in_channels=8), dict(I2I, strength=None)),
    "StableDiffusionXLPAGPipeline": (lambda: {**sdxl(), "pag_applied_layers": ["mid"]}, dict(TEXT, **PAG)),
    "StableDiffusionXLPAGImg2ImgPipeline": (lambda: {**sdxl(), "pag_applied_layers": ["mid"]}, dict(I2I, **PAG)),
    "StableDiffusionXLPAGInpaintPipeline": (lambda: {**sdxl(), "pag_applied_layers": ["mid"]}, dict(INPAINT, **PAG)),
    "StableDiffusionXLAdapterPipeline": (lambda: {**sdxl(), "adapter": adapter()}, dict(TEXT, image=image(5))),
    "StableDiffusionXLControlNetPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True)}, CN),
    "StableDiffusionXLControlNetImg2ImgPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True)},
                                                   dict(I2I, control_image=image(4), height=64, width=64)),
    "StableDiffusionXLControlNetInpaintPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True)},
                                                   dict(INPAINT, control_image=image(4))),
    "StableDiffusionXLControlNetPAGPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True),
                                                        "pag_applied_layers": ["mid"]}, dict(CN, **PAG)),
    "StableDiffusionXLControlNetPAGImg2ImgPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True),
                                                               "pag_applied_layers": ["mid"]},
                                                      dict(I2I, control_image=image(4), height=64, width=64, **PAG)),
    "StableDiffusionXLControlNetUnionPipeline": (lambda: {**sdxl(), "controlnet": controlnet(xl=True, union=True)},
                                                 dict(TEXT, control_image=[image(4)], control_mode=[0])),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": (
        lambda: {**sdxl(), "controlnet": controlnet(xl=True, union=True)},
        dict(I2I, control_image=[image(4)], control_mode=[0], height=64, width=64)),
    "StableDiffusionXLControlNetUnionInpaintPipeline": (
        lambda: {**sdxl(), "controlnet": controlnet(xl=True, union=True)},
        dict(INPAINT, control_image=[image(4)], control_mode=[0])),
}


def build(name: str):
    """A fresh pipeline of class `name` over tiny components (only the ones its __init__ takes)."""
    cls = getattr(diffusers, name)
    components, _ = PIPELINES[name]
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in components().items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, name: str, seed: int = 0):
    """One small call of the pipeline (output_type np where it has one); returns its output."""
    kwargs = {k: v for k, v in PIPELINES[name][1].items() if v is not None}
    params = inspect.signature(type(pipe).__call__).parameters
    if "output_type" in params:
        kwargs["output_type"] = "np"
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed))


def arrays(output) -> dict:
    """The numbers in a pipeline output, by field (arrays and tensors, lists of them)."""
    out = {}
    for k, v in output.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, (np.ndarray, torch.Tensor)) for x in v):
            v = np.stack([np.asarray(x) for x in v])
        if isinstance(v, torch.Tensor):
            v = v.detach().float().cpu().numpy()
        if isinstance(v, np.ndarray):
            out[k] = v
    return out
