"""Depth maps for depth-to-image: read from a file (16-bit or 8-bit grayscale PNG, or a .npy HxW float array),
taken from Python (a tensor, an array, a PIL image, or a list of them), or estimated by the model folder's own
DPT depth estimator; then brought to the latent size as StableDiffusionDepth2ImgPipeline does (bicubic, then
scaled to [-1, 1] by each map's own min and max). The scale of the values does not matter: only their order
and relative spacing survive the per-map scaling (MiDaS gives inverse depth: near is large)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import InvalidParameter

SUFFIXES = (".png", ".npy")
_GRAY_MODES = ("L", "I;16", "I;16B", "I;16L", "I", "F")
NPY_MAGIC = b"\x93NUMPY"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_depth_map(path, name: str = "depth_map") -> np.ndarray:
    """A depth map file -> an HxW float32 array. PNG: 8-bit or 16-bit grayscale; .npy: an HxW float array."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise InvalidParameter(name, str(path), "a grayscale PNG (8- or 16-bit) or a .npy HxW float array")
    if not p.is_file():
        raise InvalidParameter(name, str(path), "an existing depth map file (PNG or .npy)")
    return _decode(p.read_bytes(), name, str(path), npy=p.suffix.lower() == ".npy")


def decode_depth_map(data: bytes, name: str = "depth_map", *, max_pixels: int | None = None) -> np.ndarray:
    """Encoded depth map bytes, as a server receives them -> an HxW float32 array: a grayscale PNG (8- or
    16-bit) or a .npy file's bytes (told apart by their first bytes), at most `max_pixels` values (checked from
    the header, before anything is decoded)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidParameter(name, type(data).__name__, "a grayscale PNG (8- or 16-bit) or a .npy HxW array")
    if bytes(data[:6]) == NPY_MAGIC:
        return _decode(bytes(data), name, "the .npy data", npy=True, max_pixels=max_pixels)
    if bytes(data[:8]) == PNG_MAGIC:
        return _decode(bytes(data), name, "the PNG data", npy=False, max_pixels=max_pixels)
    raise InvalidParameter(name, "data that is neither a PNG nor a .npy array",
                           "a grayscale PNG (8- or 16-bit) or a .npy HxW array")


def _decode(data: bytes, name: str, shown: str, *, npy: bool, max_pixels: int | None = None) -> np.ndarray:
    if npy:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False, mmap_mode=None)
        except (OSError, ValueError, EOFError) as e:
            raise InvalidParameter(name, shown, f"a readable .npy array ({str(e).splitlines()[0][:80]})") from None
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise InvalidParameter(name, f"a {arr.dtype} array of shape {arr.shape}", "an HxW array of numbers")
        if max_pixels is not None and arr.size > max_pixels:
            raise InvalidParameter(name, f"a {arr.shape[1]}x{arr.shape[0]} map", f"at most {max_pixels} values")
        return arr.astype(np.float32)
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:  # from the header: not decoded yet
                raise InvalidParameter(name, f"a {im.width}x{im.height} map", f"at most {max_pixels} pixels")
            im.load()
            if im.mode not in _GRAY_MODES:
                raise InvalidParameter(name, f"a {im.mode} PNG", "a grayscale PNG (8- or 16-bit), one value a pixel")
            return np.asarray(im, dtype=np.float32)
    except InvalidParameter:
        raise
    except Exception as e:  # PIL raises many types for a corrupt file
        raise InvalidParameter(name, shown, f"a readable PNG ({type(e).__name__})") from None


def as_maps(value, name: str = "depth_map") -> list[torch.Tensor]:
    """What a caller passes as depth_map -> a list of HxW float32 tensors (one map, or one per image)."""
    if isinstance(value, (str, Path)):
        return [torch.from_numpy(read_depth_map(value, name))]
    if isinstance(value, Image.Image):
        if value.mode not in _GRAY_MODES:
            raise InvalidParameter(name, f"a {value.mode} image", "a grayscale image (mode L, I;16, I or F)")
        return [torch.from_numpy(np.asarray(value, dtype=np.float32))]
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.asarray(value, dtype=np.float32))
    if isinstance(value, torch.Tensor):
        t = value.detach().float().cpu()
        if t.dim() == 4 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() == 2:
            return [t]
        if t.dim() == 3:
            return list(t)
        raise InvalidParameter(name, f"a tensor of shape {tuple(value.shape)}", "HxW or BxHxW depth values")
    if isinstance(value, (list, tuple)) and value:
        return [m for v in value for m in as_maps(v, name)]
    raise InvalidParameter(name, type(value).__name__, "an HxW tensor or array (or BxHxW), a grayscale PIL image, "
                           "a PNG/.npy path, or a list of them")


def to_latent_size(maps: list[torch.Tensor], height: int, width: int, name: str = "depth_map") -> torch.Tensor:
    """[k, 1, height, width] in [-1, 1]: each map resized bicubically (align_corners=False) and scaled by its own
    min and max, as StableDiffusionDepth2ImgPipeline.prepare_depth_map does."""
    out = []
    for m in maps:
        if not torch.isfinite(m).all():
            raise InvalidParameter(name, "a map with NaN or inf values", "finite depth values")
        d = torch.nn.functional.interpolate(m[None, None].float(), size=(height, width), mode="bicubic",
                                            align_corners=False)
        lo, hi = torch.amin(d, dim=[1, 2, 3], keepdim=True), torch.amax(d, dim=[1, 2, 3], keepdim=True)
        if float(hi - lo) == 0.0:
            raise InvalidParameter(name, "a constant map", "a map with at least two different depth values")
        out.append(2.0 * (d - lo) / (hi - lo) - 1.0)
    return torch.cat(out)


@torch.inference_mode()
def estimate(estimator, processor, images: list) -> list[torch.Tensor]:
    """The folder's DPT depth estimator over PIL images (FP32, on its own device): one HxW map each, as the
    pipeline computes it when no depth_map is given."""
    param = next(estimator.parameters())
    pixel_values = processor(images=images, return_tensors="pt").pixel_values.to(param.device, param.dtype)
    return list(estimator(pixel_values).predicted_depth.float().cpu())
