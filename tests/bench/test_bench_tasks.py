"""Smoke test of `fastsd bench --task img2img|inpaint` on the tiny models: every configuration has its rows
(VAE encode among the components), its end-to-end figures and its parity against diffusers' Img2Img /
Inpaint pipeline. No speed is asserted (the machine is shared)."""
import contextlib
import io
import json
import math

import pytest

from fastsd.cli import main

COMPONENTS = ["text_encoder", "vae_encode", "unet_step", "vae_decode", "safety_checker"]
CASES = {  # (model, task, strength): the pipeline diffusers runs, UNet input channels, VAE encodes (diffusers, fastsd)
    ("tiny", "img2img", None): ("StableDiffusionImg2ImgPipeline", 4, (1, 1)),
    ("tiny", "inpaint", None): ("StableDiffusionInpaintPipeline", 4, (2, 1)),  # 4 channels: the diffusers way
    ("tiny-inpainting", "inpaint", "0.75"): ("StableDiffusionInpaintPipeline", 9, (2, 2)),
}


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module", params=list(CASES), ids=lambda c: f"{c[0]}-{c[1]}")
def bench_run(request, tmp_path_factory):
    model, task, strength = request.param
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    dtypes = "fp32,bf16" if model == "tiny-inpainting" else "fp32"  # bf16 once: the test's time is the runs
    argv = ["bench", "--model", model, "--task", task, "--steps", "4", "--repeat", "1", "--warmup", "0",
            "--threads", "1", "--backends", "diffusers,torch", "--dtype", dtypes, "--batch", "1", "--json",
            str(path), "-q"]
    rc, out, err = run(argv + (["--strength", strength] if strength else []))
    assert rc == 0, err
    return request.param, json.loads(path.read_text()), out


def test_rows_components_and_parity(bench_run):
    (model, task, strength), report, _ = bench_run
    pipeline, channels, (enc_base, enc_fast) = CASES[(model, task, strength)]
    s = report["settings"]
    assert (s["task"], s["pipeline"], s["components"]) == (task, pipeline, COMPONENTS)
    assert s["strength"] == (float(strength) if strength else 0.8 if task == "img2img" else 1.0)
    assert report["model"]["unet_in_channels"] == channels
    # image tasks start at the step `strength` picks: fewer UNet calls than text-to-image's 5 (PNDM, 4 steps)
    assert s["unet_calls"] == (5 if s["strength"] == 1.0 else 5 - (4 - int(4 * s["strength"])))
    shapes = report["shapes"]["1"]
    assert shapes["unet_step"]["sample"][1] == channels
    assert shapes["vae_encode"] == {"image": [1, 3, 64, 64], "latent_parameters": [1, 8, 8, 8]}
    assert [c["name"] for c in report["configs"]] == ["diffusers fp32", "torch fp32"] + \
        (["torch bf16"] if model == "tiny-inpainting" else [])
    assert report["configs"][0]["describe"]["pipeline"] == pipeline
    for c in report["configs"]:
        row = c["batches"]["1"]
        for comp in COMPONENTS:
            st = row["components"][comp]
            if comp == "safety_checker":  # the tiny models have none
                assert "skipped" in st
                continue
            assert 0 < st["median_s"] and st["speedup"] > 0
        assert row["end_to_end"]["median_s"] > 0 and row["end_to_end"]["unet_calls"] == s["unet_calls"]
        assert row["end_to_end_estimate"]["vae_encodes"] == (enc_base if c["baseline"] else enc_fast)
        if c["baseline"]:
            assert row["parity"] == {"reference": True}
            continue
        p = row["parity"]
        psnr = math.inf if p["psnr_db"] == "inf" else p["psnr_db"]
        assert p["tolerance"]["name"] == c["dtype"] and len(p["images"]) == 1
        assert p["passed"] and psnr >= p["tolerance"]["min_psnr"], p  # the same maths as diffusers' pipeline
        if c["dtype"] == "fp32":
            assert p["max_abs"] <= 2 and p["latent_cosine"] > 0.99999


def test_table_names_the_task(bench_run):
    (model, task, _), report, out = bench_run
    assert f"task: {task} ({report['settings']['pipeline']} as the baseline)" in out
    assert "VAE encode ms" in out and "VAE encode 1x3x64x64 -> 1x8x8x8" in out
    assert "pass (fp32" in out and ("pass (bf16" in out) == (model == "tiny-inpainting")


@pytest.mark.parametrize("argv, name", [
    (["--task", "outpaint"], "task"),
    (["--model", "tiny-inpainting", "--task", "img2img"], "task"),  # a 9-channel UNet: inpaint only
    (["--model", "tiny-inpainting"], "task"),
    (["--strength", "0.5"], "strength"),  # text-to-image has no strength
    (["--task", "img2img", "--strength", "1.5"], "strength"),
])
def test_bad_combination_is_one_line(argv, name):
    rc, _, err = run(["bench", "--model", "tiny", "--steps", "2", "--repeat", "1", "-q", *argv])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"fastsd bench: error: {name}:"), err
