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
