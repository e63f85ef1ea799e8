"""The page's result line names the task it ran: text-to-image for a prompt alone, image-to-image or
inpainting (with the strength) for an upload. Runs the page's generate function against a stand-in
client (no deployment): the label depends on the page alone."""
from types import SimpleNamespace

import pytest
from PIL import Image

from fastsd.ui.app import task_label

pytest.importorskip("gradio")  # the ui extra


class FakeClient:
    name = "fake"
    spec = SimpleNamespace(model="tiny", replicas=[object()], lora_dir=None)

    def __init__(self):
        self.sent = []

    def engine(self):
        return {}

    def generate(self, prompts, negatives, **kwargs):
        self.sent.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (64, 64), "red")], nsfw_content_detected=[False])


@pytest.mark.parametrize("image, mask, strength, label", [
    (None, None, 0.8, "text-to-image"),
    (Image.new("RGB", (64, 64)), None, 0.6, "image-to-image (strength 0.6)"),
    (Image.new("RGB", (64, 64)), Image.new("L", (64, 64)), 0.9, "inpainting (strength 0.9)"),
])
def test_result_line_names_the_task(tmp_path, image, mask, strength, label):
    from fastsd.ui.app import make_generate
    client = FakeClient()
    generate = make_generate(client, tmp_path)
    _, info, paths = generate("a red circle", seed=3, image=image, mask_image=mask, strength=strength)
    assert f"· {label} ·" in info, info
    assert task_label(image, mask, strength) == label
    assert ("image" in client.sent[0]) == (image is not None)  # the request matches the label
    for other in ("text-to-image", "image-to-image", "inpainting"):
        if other not in label:
            assert other not in info, info
    assert len(paths) == 1


def test_a_painted_mask_is_sent_as_the_mask_and_offered_for_download(tmp_path):
    import io

    import numpy as np
    from gradio.exceptions import Error

    from fastsd.ui.app import make_generate
    client = FakeClient()
    generate = make_generate(client, tmp_path)
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (40, 40, 64, 64))
    painted = {"background": Image.new("RGB", (64, 64), "blue"), "layers": [layer], "composite": None}
    _, info, paths = generate("a red circle", seed=3, mask_paint=painted)  # the start image uploaded in the editor
    sent = np.asarray(Image.open(io.BytesIO(client.sent[0]["mask_image"][0])))
    assert "inpainting (strength 0.8)" in info and "painted mask" in info
    assert sent[50, 50] == 255 and sent[10, 10] == 0 and (sent == 255).sum() == 24 * 24
    assert np.array_equal(np.asarray(Image.open(paths[-1])), sent) and paths[-1].endswith("mask.png")
    with pytest.raises(Error, match="mask_paint"):  # painted and uploaded: which one is meant?
        generate("a red circle", seed=3, image=Image.new("RGB", (64, 64)), mask_image=Image.new("L", (64, 64)),
                 mask_paint=painted)
