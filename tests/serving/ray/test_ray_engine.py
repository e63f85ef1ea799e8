"""The Ray engine replica in this process, without a cluster (`@serve.batch` runs on any asyncio loop):
concurrent calls share engine calls and give the images they get alone (one level of 255 at most: batched
GEMMs round differently, as in the MII path's batcher); a request past its deadline, or cancelled by its
caller, is dropped and a running engine call stops; a bad value is refused naming it."""
import asyncio

import numpy as np
import pytest

pytest.importorskip("ray.serve")
from fastsd.serving.ray.config import RayAppConfig  # noqa: E402
from fastsd.serving.ray.engine import EngineReplica  # noqa: E402

PROMPT, STEPS = "a red circle on a green square", 4


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: serve.batch's queue lives on the loop of its first call."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def replica():
    # outside a replica there is no deployment config to compare max_batch with (Serve only warns there)
    from ray.serve import batching
    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    cfg = RayAppConfig.from_args({"model": "fastsd-shapes", "threads": 1, "max_batch": 4})
    return EngineReplica(cfg.spec(), 4, 0.3)


def call(seed, steps=STEPS, seconds=60.0, **params):
    return {"prompt": [PROMPT], "parameters": {"num_inference_steps": steps, "seed": seed, "scheduler": "euler",
                                               **params}, "seconds": seconds, "request_id": f"t{seed}"}


def level_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def test_concurrent_calls_share_an_engine_call(loop, replica, shapes_engine):
    async def run():
        return await asyncio.gather(*(replica.generate(call(s)) for s in (1, 2, 3)))
    merged = replica.merged
    outs = loop.run_until_complete(run())
    assert replica.merged == merged + 1  # one engine call for the three
    for seed, out in zip((1, 2, 3), outs):
        alone = shapes_engine.generate(PROMPT, num_inference_steps=STEPS, seed=seed, scheduler="euler",
                                       progress=False).images[0]
        assert len(out["images"]) == 1 and level_diff(out["images"][0], alone) <= 1


def test_deadline_cancel_and_bad_values(loop, replica):
    async def run():
        late = await replica.generate(call(4, seconds=0.0))
        bad = await replica.generate(call(5, steps=0))
        nolora = await replica.generate(call(6, lora="speckle"))
        task = asyncio.ensure_future(replica.generate(call(7, steps=60)))
        calls = replica.calls
        while replica.calls == calls and not task.done():
            await asyncio.sleep(0.05)  # wait for its engine call to start... then the caller goes away
            if replica.lock.locked():
                task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        while replica.lock.locked():
            await asyncio.sleep(0.05)
        return late, bad, nolora
    stopped = replica.stopped
    late, bad, nolora = loop.run_until_complete(run())
    assert late["error"] == "DEADLINE_EXCEEDED"
    assert bad["error"] == "INVALID_ARGUMENT" and bad["message"].startswith("num_inference_steps")
    assert nolora["error"] == "INVALID_ARGUMENT" and nolora["message"].startswith("lora")
    assert replica.stopped == stopped + 1  # the 60-step call stopped at a step: nobody wanted it


def test_image_to_image_is_the_engines_image(loop, replica, shapes_engine):
    import io
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (64, 64), (20, 40, 160))
    ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=(200, 30, 30))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    out = loop.run_until_complete(replica.generate({**call(9, strength=0.6), "image": [buf.getvalue()]}))
    want = shapes_engine.generate(PROMPT, image=im, strength=0.6, num_inference_steps=STEPS, seed=9,
                                  scheduler="euler", progress=False).images[0]
    assert level_diff(out["images"][0], want) == 0  # alone in its engine call: exactly the engine's image
    big = loop.run_until_complete(replica.generate({**call(9, strength=0.6), "image": [b"\x89PNG" + b"0" * 64]}))
    assert big["error"] == "INVALID_ARGUMENT" and big["message"].startswith("image")
