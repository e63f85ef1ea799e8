"""`fastsd bench --few-step` on the tiny model: every configuration's time per image at LCM, 4 steps, guidance 1
beside the run's own generation, with its parity against the baseline's own LCM images. No speed is asserted
(the machine is shared), only that it is measured, reported and checked."""
import contextlib
import io
import json

import pytest

from fastsd.cli import main


@pytest.fixture(scope="module")
def few_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-few") / "bench.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["bench", "--model", "tiny", "--steps", "3", "--repeat", "1", "--warmup", "0", "--threads", "1",
                   "--backends", "diffusers,torch,onnxruntime,openvino", "--accelerate", "--few-step", "--batch", "1,2",
                   "--no-safety-checker", "--json", str(out), "--quiet"])
    return rc, stdout.getvalue(), stderr.getvalue(), json.loads(out.read_text())


def test_every_configuration_has_its_few_step_row(few_step_run):
    rc, stdout, stderr, report = few_step_run
    assert rc == 0, stderr
    assert report["settings"]["few_step"] == {"scheduler": "lcm", "steps": 4, "guidance": 1.0, "unet_calls": 4}
    measured = [c["name"] for c in report["configs"]]
    assert {"diffusers fp32", "torch fp32", "accelerate fp32"} <= set(measured)
    for c in report["configs"]:
        for b in ("1", "2"):
            st = c["batches"][b]["few_step"]
            assert "failed" not in st, (c["name"], st)
            assert st["per_image_s"] > 0 and st["default_per_image_s"] > 0 and st["unet_calls"] == 4
            assert st["per_image_s"] == pytest.approx(st["median_s"] / int(b))
            if c["baseline"]:
                assert st["parity"] == {"reference": True}
            else:  # fp32 everywhere: the few-step images are the baseline's within the fp32 tolerance
                assert st["parity"]["passed"], (c["name"], st["parity"])


def test_the_table_shows_time_per_image(few_step_run):
    _, stdout, _, _ = few_step_run
    assert "time per image: this run's generation (3 steps pndm, guidance 7.5" in stdout
    assert "few-step (lcm, 4 steps, guidance 1: 4 UNet calls, no classifier-free guidance)" in stdout
    lines = [ln for ln in stdout.splitlines() if ln.strip().startswith("torch fp32") and " s/img" not in ln]
    assert any("pass" in ln for ln in lines), stdout


def test_a_named_recipe_is_timed_with_guidance(tmp_path):
    """`--few-step tcd,2,1.5` (the shipped adapter's kind of recipe): TCD, 2 steps, guidance 1.5, checked against
    the baseline's own TCD images."""
    out = tmp_path / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        rc = main(["bench", "--model", "tiny", "--steps", "3", "--repeat", "1", "--warmup", "0", "--threads", "1",
                   "--backends", "diffusers,torch", "--few-step", "tcd,2,1.5", "--no-safety-checker",
                   "--json", str(out), "--quiet"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["few_step"] == {"scheduler": "tcd", "steps": 2, "guidance": 1.5, "unet_calls": 2}
    st = next(c for c in report["configs"] if c["name"] == "torch fp32")["batches"]["1"]["few_step"]
    assert st["parity"]["passed"] and st["guidance"] == 1.5
    assert "few-step (tcd, 2 steps, guidance 1.5: 2 UNet calls)" in stdout.getvalue()


@pytest.mark.parametrize("bad", ["tcd,x,1", "euler-ish,4,1", "lcm,0,1", "lcm,4"])
def test_a_bad_recipe_is_one_line_naming_the_option(bad, capsys):
    assert main(["bench", "--model", "tiny", "--backends", "diffusers", "--few-step", bad, "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "--few-step" in err and "SCHEDULER,STEPS,GUIDANCE" in err and "Traceback" not in err, err
