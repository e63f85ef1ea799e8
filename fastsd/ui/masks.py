"""The mask the user paints over the start image in the page (Gradio's ImageEditor) -> the mask fastsd's
inpainting takes: an "L" image of the start image's size, white (255) = repaint, black (0) = keep.

The editor's value is {"background", "layers", "composite"}; with type="pil" each layer is an RGBA image of
the background's size, transparent where nothing was painted. A pixel is repainted where any layer's
alpha is at least half (128 of 255): the threshold at which fastsd (and diffusers' mask processor)
binarizes a grey mask, so a soft brush edge means the same here as in an uploaded mask. The result is
already black and white, so sending it changes nothing downstream: the same mask file given to `fastsd
generate --mask` gives the same image.
"""
from __future__ import annotations

from ..errors import InvalidParameter

REPAINT_ALPHA = 128


def painted_mask(value, size: tuple[int, int] | None = None):
    """The painted mask of an ImageEditor value (None where nothing is painted). `size`: the start image's
    size the layers must have (a layer of another size is an error naming `mask_paint`)."""
    from PIL import Image, ImageChops
    if not isinstance(value, dict):
        return None
    layers = [layer for layer in value.get("layers") or [] if layer is not None]
    if not layers:
        return None
    alpha = None
    for layer in layers:
        if not isinstance(layer, Image.Image):
            raise InvalidParameter("mask_paint", type(layer).__name__, "layers painted in the page's editor")
        a = layer.convert("RGBA").getchannel("A")
        if size is not None and a.size != tuple(size):
            raise InvalidParameter("mask_paint", f"a layer of {a.size[0]}x{a.size[1]}",
                                   f"layers of the start image's size {size[0]}x{size[1]}")
        alpha = a if alpha is None else ImageChops.lighter(alpha, a)
    mask = alpha.point(lambda v: 255 if v >= REPAINT_ALPHA else 0)
    return mask if mask.getbbox() else None
