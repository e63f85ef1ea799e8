"""LoRA in serving: the `lora` keyword names adapters of --lora-dir only, bad values are INVALID_ARGUMENT /
422, the batcher merges only requests with the same set, and the replica keeps the last set fused."""
import threading

import numpy as np
import pytest

pytest.importorskip("mii")

from fastsd.errors import InvalidParameter
from fastsd.lora_files import random_factors, save_diffusers_layout, save_kohya_layout
from fastsd.serving.batcher import BatchingPipeline
from fastsd.serving.request import Limits, parse
from fastsd.serving.loras import LoraCatalog
from fastsd.serving.rest import read_score_body


@pytest.fixture(scope="module")
def engine():
    from fastsd import load_model, optimize
    return optimize(load_model("tiny"), dtype="fp32")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, _tiny):
    d = tmp_path_factory.mktemp("lora-dir")
    save_diffusers_layout(random_factors(_tiny, rank=4, seed=1), d / "alpha.safetensors")
    save_kohya_layout(random_factors(_tiny, rank=2, seed=2), d / "beta.safetensors")
    (d / "notes.txt").write_text("not a LoRA")
    return d


def test_catalog_parses_names_and_scales(lora_dir):
    cat = LoraCatalog(lora_dir)
    assert cat.names() == ["alpha", "beta"]
    assert cat.parse("alpha") == (("alpha", 1.0),)
    assert cat.parse("beta:0.5, alpha:0.8") == (("alpha", 0.8), ("beta", 0.5))  # sorted: one batch key per set
    for bad, name in [("gamma", "lora"), ("../alpha", "lora"), (str(lora_dir / "alpha.safetensors"), "lora"),
                      ("alpha:x", "lora scale"), ("alpha:", "lora scale"), ("alpha:50", "lora scale"),
                      (3, "lora"), ("a,b,c,d,e", "lora")]:
        with pytest.raises(InvalidParameter) as e:
            cat.parse(bad)
        assert e.value.name == name, bad
    with pytest.raises(InvalidParameter, match="lora-dir"):
        LoraCatalog(lora_dir / "missing")


def test_request_keyword(lora_dir):
    cat = LoraCatalog(lora_dir)
    r = parse(["a"], None, {"lora": "alpha:0.8", "seed": 1}, Limits(), 64, loras=cat)
    assert r.loras == (("alpha", 0.8),) and r.key != parse(["a"], None, {"seed": 1}, Limits(), 64, loras=cat).key
    with pytest.raises(InvalidParameter, match="without --lora-dir"):
        parse(["a"], None, {"lora": "alpha"}, Limits(), 64)
    q = read_score_body(b'{"input_data": {"columns": ["prompt"], "data": ["a"], '
                        b'"parameters": {"lora": "alpha:0.8"}}}')
    assert q.parameters == {"lora": "alpha:0.8"}


def test_batcher_merges_same_set_only_and_keeps_it_fused(engine, lora_dir):
    cat = LoraCatalog(lora_dir)
    pipe = BatchingPipeline(engine, max_batch=8, window=0.5, loras=cat)
    try:
        jobs = [("alpha:0.8", 1), ("beta", 2), ("alpha:0.8", 3), (None, 4)]
        out = [None] * len(jobs)

        def call(i):
            lora, seed = jobs[i]
            kw = {"lora": lora} if lora else {}
            out[i] = pipe(prompt=["a red circle"], negative_prompt=[""], num_inference_steps=3, seed=seed, **kw)
        ts = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        assert pipe.stats.requests == 4 and pipe.stats.batches == 3  # the two alpha requests share one
        assert pipe.stats.lora_switches >= 2
        pipe(prompt=["a red circle"], negative_prompt=[""], num_inference_steps=3, seed=9, lora="beta")
        switches = pipe.stats.lora_switches
        pipe(prompt=["a red circle"], negative_prompt=[""], num_inference_steps=3, seed=9, lora="beta")
        assert pipe.stats.lora_switches == switches  # the last set stays fused: a run for it pays no switch
        for (lora, seed), reply in zip(jobs, out):
            engine.set_loras(cat.refs(cat.parse(lora)) if lora else [])
            alone = engine.generate(["a red circle"], [""], num_inference_steps=3, seed=seed, progress=False)
            a, b = np.asarray(reply.images[0], np.int16), np.asarray(alone.images[0], np.int16)
            assert np.abs(a - b).max() <= 1, lora
        assert pipe.stats.lora_switches == switches
    finally:
        pipe.close()
