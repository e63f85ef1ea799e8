"""`fastsd bench --lora`: diffusers runs the LoRA as PEFT layers (load_lora_weights), fastsd fused; the
final images agree within FP32 tolerance, and bench/lora.py runs end to end on the tiny model."""
import json

import pytest

from fastsd.cli import main

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, _tiny):
    from fastsd.lora_files import random_factors, save_kohya_layout
    return save_kohya_layout(random_factors(_tiny, rank=4, seed=1), tmp_path_factory.mktemp("l") / "k.safetensors")


def test_bench_with_lora_keeps_fp32_parity(lora_file, tmp_path):
    out = tmp_path / "b.json"
    assert main(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "--threads", "1", "-q",
                 "--lora", f"{lora_file}:0.8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    fastsd = report["configs"][1]
    assert fastsd["describe"]["loras"] == ["k.safetensors:0.8"]
    assert fastsd["batches"]["1"]["parity"]["passed"] is True


def test_lora_benchmark_runs(tmp_path):
    from fastsd.bench.lora import main as bench_lora
    out = tmp_path / "l.json"
    assert bench_lora(["--model", "tiny", "--rank", "4", "--switches", "2", "--steps-timed", "1",
                       "--requests", "4", "--clients", "2", "--serving-steps", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["engine"]["tensors_fused"] > 0 and r["engine"]["unet_step_ratio_lora_over_none"] > 0
    assert r["serving"]["alternating_two"]["switches"] >= 1 and r["serving"]["one_adapter"]["switches"] == 0
