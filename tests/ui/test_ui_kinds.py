"""The page's generate function (behind the button and /generate) with a depth or x4 upscaler deployment: it
asks the deployment which kind its model is and sends an upscaler `noise_level` instead of `strength`."""
import io
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("gradio")

from fastsd.ui.app import make_generate  # noqa: E402


class FakeClient:
    """Stands for fastsd.serving.client.DeploymentClient: records each request, answers 4x (an upscaler)."""
    name = "fake"

    def __init__(self, kind):
        self.kind, self.sent = kind, []
        self.spec = SimpleNamespace(model="m", replicas=[0], limits=None, lora_dir=None)

    def engine(self):
        return {"model": "m", "kind": self.kind, "dtype": "float32", "backend": "torch", "device": "cpu",
                "attention": "sdpa"}

    def generate(self, prompts, negatives=None, **kw):
        self.sent.append(kw)
        w, h = Image.open(io.BytesIO(kw["image"][0])).size
        scale = 4 if self.kind == "upscale" else 1
        return SimpleNamespace(images=[Image.new("RGB", (scale * w, scale * h))], nsfw_content_detected=[False])


@pytest.mark.parametrize("kind", ["upscale", "depth"])
def test_page_sends_what_the_kind_takes(kind, tmp_path):
    client = FakeClient(kind)
    generate = make_generate(client, tmp_path)
    gallery, info, paths = generate("a red disc", image=Image.new("RGB", (32, 32)), strength=0.6, noise_level=40,
                                    seed=1)
    sent = client.sent[-1]
    if kind == "upscale":
        assert sent["noise_level"] == 40 and "strength" not in sent
        assert "x4 upscale (noise level 40)" in info and "128x128" in info
    else:
        assert sent["strength"] == 0.6 and "noise_level" not in sent
        assert "depth-to-image (strength 0.6)" in info
