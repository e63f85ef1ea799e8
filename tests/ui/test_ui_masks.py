"""The painted layer of the page's image editor -> fastsd's inpainting mask (white = repaint)."""
import numpy as np
import pytest
from PIL import Image

from fastsd.errors import InvalidParameter
from fastsd.ui.masks import painted_mask


def layer(size=(8, 6), painted=(), alpha=255):
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    for xy in painted:
        im.putpixel(xy, (255, 0, 255, alpha))
    return im


def test_painted_pixels_are_white_the_rest_black():
    mask = painted_mask({"background": Image.new("RGB", (8, 6)), "layers": [layer(painted=[(1, 2), (7, 5)])]},
                        (8, 6))
    a = np.asarray(mask)
    assert mask.mode == "L" and mask.size == (8, 6)
    assert a[2, 1] == 255 and a[5, 7] == 255 and (a == 255).sum() == 2 and set(np.unique(a)) == {0, 255}


def test_layers_are_united_and_a_soft_edge_is_cut_where_fastsd_binarizes():
    # fastsd (diffusers' mask processor) repaints where mask/255 >= 0.5: alpha 128 is in, 127 out
    value = {"layers": [layer(painted=[(0, 0)], alpha=128), layer(painted=[(1, 0)], alpha=127),
                        layer(painted=[(2, 0)])]}
    a = np.asarray(painted_mask(value, (8, 6)))
    assert a[0, 0] == 255 and a[0, 1] == 0 and a[0, 2] == 255


def test_nothing_painted_is_no_mask():
    assert painted_mask(None) is None
    assert painted_mask({"background": Image.new("RGB", (8, 6)), "layers": []}) is None
    assert painted_mask({"layers": [layer()]}, (8, 6)) is None  # an empty layer


def test_a_layer_of_another_size_names_the_field():
    with pytest.raises(InvalidParameter, match="mask_paint.*start image's size 8x6"):
        painted_mask({"layers": [layer(size=(4, 4), painted=[(0, 0)])]}, (8, 6))
