"""`fastsd serve --device cuda --replicas N` without --gpus: replicas spread over the visible GPUs (a fake
device count; no GPU needed), keeping the operator's CUDA_VISIBLE_DEVICES names."""
import pytest

pytest.importorskip("mii")  # the serving extra


def placements(tmp_path, monkeypatch, count, replicas=3, on_gpu=True, gpus=None):
    import torch

    from fastsd.serving.ports import free_port_block
    from fastsd.serving.records import plan_replicas
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    ddir = tmp_path / f"gpu{count}{on_gpu}"
    ddir.mkdir()
    plan, _ = plan_replicas("gpus", ddir, replicas, free_port_block(replicas + 1), "127.0.0.1", None, gpus,
                            "fastsd-shapes", on_gpu)
    return [r.cuda_visible_devices for r in plan]


def test_replicas_spread_over_the_visible_gpus(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert placements(tmp_path, monkeypatch, 2) == ["0", "1", "0"]


def test_the_operators_mask_names_the_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert placements(tmp_path, monkeypatch, 2) == ["5", "7", "5"]


def test_gpus_given_cpu_engines_and_no_gpu_are_left_as_they_were(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert placements(tmp_path, monkeypatch, 2, gpus=[1]) == [1, 1, 1]
    assert placements(tmp_path, monkeypatch, 2, on_gpu=False) == [None, None, None]
    assert placements(tmp_path, monkeypatch, 0) == [None, None, None]
