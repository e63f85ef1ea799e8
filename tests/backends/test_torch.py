"""The torch backend's memory planning (attention slicing, VAE tiling) and CUDA-graph switch, on the tiny model."""
import logging

import numpy as np
import pytest

from fastsd import optimize
from fastsd.errors import InvalidParameter


def _generate(engine, size=64):
    return engine.generate("a cat", num_inference_steps=2, seed=3, height=size, width=size, progress=False,
                           output_type="np")


def test_forced_slicing_matches_unsliced(tiny):
    import copy
    plain = _generate(optimize(copy.deepcopy(tiny)))
    engine = optimize(tiny, attention_slicing="on")
    sliced = _generate(engine)
    assert "attention_slicing" in engine.describe()["applied"]
    assert np.abs(np.asarray(sliced.images) - np.asarray(plain.images)).max() < 1e-5


def test_forced_tiling_tiles_large_images(tiny):
    engine = optimize(tiny, vae_tiling="on")
    result = _generate(engine, size=128)  # the tiny VAE's tile is 64 px, so 128 px really tiles
    assert engine.backend.vae.use_tiling and "vae_tiling" in engine.describe()["applied"]
    assert np.isfinite(np.asarray(result.images)).all()


def test_auto_slices_and_tiles_only_when_memory_is_short(tiny, monkeypatch):
    from fastsd.kernels import memory
    engine = optimize(tiny)
    _generate(engine, size=128)
    assert engine.backend.memory_plan == (False, False)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: (64 * 1024, "test budget"))
    _generate(engine, size=128)
    slicing, tiling = engine.backend.memory_plan
    assert slicing and tiling and engine.backend.vae.use_tiling
    monkeypatch.undo()
    _generate(engine, size=128)  # memory back: the plan (and the modules) go back too
    assert engine.backend.memory_plan == (False, False) and not engine.backend.vae.use_tiling


def test_bad_memory_switch_names_the_parameter(tiny):
    with pytest.raises(InvalidParameter, match="vae_tiling"):
        optimize(tiny, vae_tiling="sometimes")


def test_cuda_graphs_on_cpu_are_off_with_a_reason(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="fastsd"):
        engine = optimize(tiny, cuda_graphs=True)
    assert engine.backend.graphs is None and "cuda_graphs" not in engine.describe()["applied"]
    assert any("cuda_graphs off" in r.getMessage() and "CUDA" in r.getMessage() for r in caplog.records)
    assert np.isfinite(np.asarray(_generate(engine).images)).all()
