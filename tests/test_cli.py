"""The command line: what a user types, what they get back, and one-line errors with exit code 2."""
import json

import pytest
from PIL import Image

from fastsd.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_writes_images(capsys, tmp_path):
    out = tmp_path / "img.png"
    code, stdout, _ = run(capsys, "generate", "a cat", "a dog", "--model", "tiny", "--steps", "2", "--seed", "7",
                          "--num-images", "2", "--out", str(out), "--quiet", "--scheduler", "euler")
    assert code == 0
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-0.png", "img-1.png", "img-2.png", "img-3.png"]
    assert Image.open(files[0]).size == (64, 64)
    assert "seed=7" in stdout and "seed=10" in stdout


def test_generate_names_the_scheduler_that_ran(capsys, tmp_path):
    argv = ("generate", "a cat", "--model", "tiny", "--steps", "2", "--out", str(tmp_path / "i.png"))
    _, _, default = run(capsys, *argv)
    _, _, named = run(capsys, *argv, "--scheduler", "tcd")
    assert "'scheduler': 'pndm'" in default and "'scheduler': 'tcd'" in named, (default, named)


def test_verify_passes_and_writes_json(capsys, tmp_path):
    report = tmp_path / "v.json"
    code, stdout, _ = run(capsys, "verify", "--model", "tiny", "--steps", "3", "--json", str(report), "--quiet")
    assert code == 0, stdout
    assert "PASS" in stdout and "PSNR" in stdout
    data = json.loads(report.read_text())
    assert data["passed"] and len(data["images"]) == 2
    assert data["images"][0]["max_abs"] <= data["tolerance"]["max_abs"]


def test_models_lists_presets_with_counts(capsys):
    code, stdout, _ = run(capsys, "models")
    assert code == 0
    assert "sd-1.4" in stdout and "859.52M" in stdout and "579.38M" in stdout and "865.91M" in stdout


BAD = [
    (["generate", ""], "prompt"),
    (["generate", "   "], "prompt"),
    (["generate", "x", "--height", "100"], "height"),
    (["generate", "x", "--width", "4096"], "width"),
    (["generate", "x", "--height", "32"], "height"),
    (["generate", "x", "--steps", "0"], "steps"),
    (["generate", "x", "--steps", "1001"], "steps"),
    (["generate", "x", "--guidance", "-1"], "guidance"),
    (["generate", "x", "--guidance", "nan"], "guidance"),
    (["generate", "x", "--guidance", "inf"], "guidance"),
    (["generate", "x", "--scheduler", "magic"], "scheduler"),
    (["generate", "x", "--num-images", "0"], "num_images"),
    (["generate", "x", "--model", "no-such-model"], "model"),
    (["generate", "x", "--model", "/nonexistent/folder"], "model"),
    (["generate", "x", "--out", "/proc/forbidden/x.png"], "out"),
    (["generate", "x", "--out", "image.txt"], "out"),
    (["generate", "x", "--device", "tpu"], "device"),
    (["generate", "x", "--device", "cuda"], "device"),
    (["generate", "x", "--attention", "magic"], "attention"),
    (["generate", "x", "--backend", "magic"], "backend"),
    (["generate", "x", "--attention", "xformers"], "attention"),  # not installed in the test environment
    (["verify", "--seed", "-5"], "seed"),
]


@pytest.mark.parametrize("argv,param", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_naming_the_parameter(capsys, tmp_path, argv, param):
    if "--out" not in argv and argv[0] == "generate":
        argv = argv + ["--out", str(tmp_path / "x.png")]
    code, _, err = run(capsys, *argv, "--model", "tiny", "--steps", "1", "--quiet") if "--model" not in argv \
        and "--steps" not in argv else run(capsys, *argv, "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"error: {param}" in lines[0] and "Traceback" not in err


def test_corrupt_checkpoint_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "generate", "x", "--model", str(bad), "--out", str(tmp_path / "x.png"), "--quiet")
    assert code == 2 and "model:" in err and len(err.strip().splitlines()) == 1


def test_long_prompt_is_truncated_with_a_warning(caplog, tmp_path):
    with caplog.at_level("WARNING", logger="fastsd"):
        code = main(["generate", "word " * 100, "--model", "tiny", "--steps", "1", "--quiet",
                     "--out", str(tmp_path / "x.png")])
    assert code == 0
    assert any("truncated" in r.message for r in caplog.records)


def test_prompt_outside_the_shapes_grammar_still_generates(capsys, tmp_path):
    code, stdout, _ = run(capsys, "generate", "a cat", "--model", "fastsd-shapes", "--steps", "1", "--quiet",
                          "--out", str(tmp_path / "x.png"))
    assert code == 0 and "judge: none" in stdout and (tmp_path / "x.png").is_file()


def test_shapes_prompt_gets_a_verdict(capsys, tmp_path):
    code, stdout, _ = run(capsys, "generate", "a red circle on a blue background", "--steps", "2", "--quiet",
                          "--seed", "0", "--out", str(tmp_path / "x.png"))
    assert code == 0 and "judge: " in stdout and "asked red" in stdout and "asked blue" in stdout


@pytest.mark.parametrize("argv, names", [
    (["generate", "x", "--steps", "abc"], "--steps"),
    (["generate", "x", "--dtype", "fp8"], "--dtype"),
    (["verify", "--attention-slicing", "x"], "--attention-slicing"),
    (["export", "--out"], "--out"),
    (["bench", "--repeat", "many"], "--repeat"),
])
def test_argparse_errors_are_one_line(capsys, argv, names):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and names in err[0] and err[0].startswith("fastsd "), err


def test_command_modules_do_not_import_the_cli():
    """Imports point down: the subcommands share fastsd.options, never fastsd.cli."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    for path in [*root.glob("fastsd/**/*.py"), *root.glob("export/*.py"), *root.glob("bench/*.py")]:
        if path == root / "fastsd" / "cli.py":
            continue
        text = path.read_text()
        assert not re.search(r"fastsd\.cli\b|from \.\.cli\b", text), path
        if path.parent == root / "fastsd":
            assert not re.search(r"from \.cli\b", text), path
