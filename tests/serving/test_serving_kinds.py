"""A depth-to-image or x4 upscaler deployment's requests: the replica's parser (image required, no mask,
noise_level / strength by kind, the upscaler's output 4x its image) and the batcher, whose replies equal the
engine's own images. The REST /score body takes `noise_level` like any parameter."""
import numpy as np
import pytest

import mii  # noqa: F401 - the serving extra

from fastsd import load_model, optimize
from fastsd.errors import InvalidParameter
from fastsd.serving.batcher import BatchingPipeline
from fastsd.serving.request import Limits, parse, parse_score_body
from fastsd.verify_kinds import sample_image

LIM = Limits(max_pixels=512 * 512)


def test_parse_by_kind():
    low = sample_image((16, 24))
    r = parse(["a", "b"], None, {"noise_level": 40, "num_inference_steps": 3, "seed": 1}, LIM, 64, image=[low],
              unet_in_channels=7)
    assert r.task == "upscale" and (r.width, r.height) == (64, 96) and r.noise_level == 40 and r.strength is None
    assert len(r.images) == 2 and r.key != parse(["a"], None, {"noise_level": 41}, LIM, 64, image=[low],
                                                  unet_in_channels=7).key
    d = parse("a", None, {"strength": 0.6}, LIM, 64, image=[sample_image((64, 64))], unet_in_channels=5)
    assert d.task == "depth" and d.strength == 0.6 and (d.width, d.height) == (64, 64)
    for kwargs, channels, image, match in [
        ({}, 7, None, "image: got None; allowed: an image: this deployment runs the x4 upscaler"),
        ({"height": 128}, 7, [low], "height: got 128; allowed: nothing with the x4 upscaler"),
        ({"strength": 0.5}, 7, [low], "strength: got 0.5; allowed: nothing with the x4 upscaler"),
        ({"noise_level": 20}, 5, [low], "noise_level: got 20; allowed: only with an x4 upscaler deployment"),
        ({"noise_level": 20}, 4, None, "noise_level: got 20; allowed: only with an x4 upscaler deployment"),
        ({"noise_level": 351}, 7, [low], r"noise_level: got 351; allowed: an integer in \[0, 350\]"),
    ]:
        with pytest.raises(InvalidParameter, match=match):
            parse("a", None, kwargs, LIM, 64, image=image, unet_in_channels=channels)


def test_score_body_takes_noise_level():
    q = parse_score_body({"input_data": {"columns": ["prompt"], "data": ["a cat"],
                                         "parameters": {"noise_level": 30}}}, LIM)
    assert q.parameters == {"noise_level": 30}


@pytest.mark.parametrize("preset", ["tiny-upscaler", "tiny-depth"])
def test_batcher_replies_equal_the_engine(preset):
    engine = optimize(load_model(preset), dtype="fp32")
    image = sample_image((16, 16) if preset == "tiny-upscaler" else (64, 64))
    kw = {"noise_level": 30} if preset == "tiny-upscaler" else {"strength": 0.7}
    pipe = BatchingPipeline(engine, max_batch=4, window=0.1)
    try:
        reply = pipe(prompt=["a red disc"], negative_prompt=[""], image=[image], num_inference_steps=3, seed=4, **kw)
    finally:
        pipe.close()
    alone = engine.generate("a red disc", "", num_inference_steps=3, seed=4, image=image, progress=False, **kw)
    assert reply.images[0].size == alone.images[0].size == (64, 64)
    assert np.abs(np.asarray(reply.images[0], np.int16) - np.asarray(alone.images[0], np.int16)).max() <= 1


def test_openai_edits_take_noise_level():
    from types import SimpleNamespace

    from fastsd.serving.openai_api import translate
    gw = SimpleNamespace(model_id="sd-x4-upscaler")
    fields, fmt = translate({"prompt": "a cat", "noise_level": "30", "seed": "1"}, gw, multipart=True)
    assert fields["parameters"]["noise_level"] == 30 and fmt == "b64_json"
