"""`fastsd batch`: 20 rows through the local engine and through a live deployment, a run killed with SIGKILL
and resumed (the same files as a run straight through), bad rows, and bad columns."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastsd.cli import main

pytestmark = pytest.mark.timeout(900)
COLOURS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "black"]
SHAPES = ["circle", "square", "triangle"]
ARGS = ["--model", "fastsd-shapes", "--steps", "6", "--quiet"]


def env():
    """Read when a subprocess starts: the deployment fixture sets MII_CACHE_PATH after import."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def prompts(n):
    out = []
    for i in range(n):
        c, bg = COLOURS[i % 8], COLOURS[(i + 3) % 8]
        out.append(f"a {c} {SHAPES[i % 3]} on a {bg} background")
    return out


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def twenty(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-in")
    rows = [[p] + ([str(100 + i)] if i % 5 == 0 else [""]) for i, p in enumerate(prompts(20))]
    return write_csv(d / "shapes.csv", ["prompt", "seed"], rows)


@pytest.fixture(scope="module")
def straight(twenty, tmp_path_factory):
    """An uninterrupted local run: the reference the other runs are compared with."""
    out = tmp_path_factory.mktemp("batch-straight")
    assert main(["batch", str(twenty), "--out", str(out), "--batch-size", "4", *ARGS]) == 0
    return out


def read_predictions(out: Path):
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.reader(f))


def files(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def test_local_batch_writes_the_azure_format(straight):
    lines = read_predictions(straight)
    assert len(lines) == 20
    assert lines[0] == ["0", prompts(20)[0], "shapes-0.png", "False", "shapes.csv"]  # no header, as Azure ML
    assert [int(line[0]) for line in lines] == list(range(20))
    for line in lines:
        assert Image.open(straight / line[2]).size == (64, 64)
    assert not (straight / "errors.csv").exists()
    assert not list(straight.glob(".*.tmp"))


def test_local_batch_matches_generate(straight, tmp_path):
    """Row 5 has seed 105 in its CSV; row 7 has none and gets --seed (0) + its row number."""
    for row, seed in ((5, 105), (7, 7)):
        out = tmp_path / f"g{row}.png"
        assert main(["generate", prompts(20)[row], "--seed", str(seed), "--out", str(out), *ARGS]) == 0
        a = np.asarray(Image.open(out), np.int16)
        b = np.asarray(Image.open(straight / f"shapes-{row}.png"), np.int16)
        assert np.abs(a - b).max() <= 1  # a batch of 4 rounds its GEMMs a little differently from 1


@pytest.mark.slow  # kills and restarts a batch: about a minute on 2 shared cores
def test_killed_batch_resumes_to_the_same_files(twenty, straight, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "fastsd.cli", "batch", str(twenty), "--out", str(out), "--batch-size", "4", *ARGS]
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 600
        while time.monotonic() < end and proc.poll() is None:
            pred = out / "predictions.csv"
            if pred.exists() and len(pred.read_text().splitlines()) >= 8:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the batch ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(read_predictions(out))
    assert 8 <= done < 20, done
    again = subprocess.run(argv[:-1], env=env(), capture_output=True, text=True, timeout=600)  # with progress
    assert again.returncode == 0, again.stderr
    assert f"{done} already done" in again.stderr and "skipping them" in again.stderr
    assert "img/s" in again.stderr or "s/img" in again.stderr  # the progress bar
    assert files(out) == files(straight)  # byte for byte: every PNG and predictions.csv


def test_bad_rows_go_to_errors_csv_and_the_batch_goes_on(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    write_csv(src / "a.csv", ["prompt", "negative_prompt", "seed"],
              [["a red circle", "", "1"], ["", "", ""], ["a blue square", "", "x"], ["a green circle", "blurry", ""]])
    (src / "b.csv").write_text("prompt\na white square\nx,y\n")
    (src / "notes.txt").write_text("not an input")
    out = tmp_path / "out"
    code = main(["batch", str(src), "--out", str(out), "--model", "fastsd-shapes", "--steps", "2", "--quiet"])
    assert code == 1
    done = read_predictions(out)
    assert [(r[4], r[0], r[2]) for r in done] == [("a.csv", "0", "a-0.png"), ("a.csv", "3", "a-3.png"),
                                                    ("b.csv", "0", "b-0.png")]
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [(e["input_csv_name"], e["row_number_per_file"]) for e in errors] == [("a.csv", "1"), ("a.csv", "2"),
                                                                              ("b.csv", "1")]
    assert errors[0]["error"].startswith("prompt:") and errors[1]["error"].startswith("seed:")
    assert "values for 1 columns" in errors[2]["error"]
    err = capsys.readouterr().err
    assert "3 failed" in err and "errors.csv" in err


@pytest.mark.parametrize("content, message", [
    ("text\na red circle\n", "'prompt' column"),
    ("prompt,style\na red circle,x\n", "unknown column 'style'"),
    ("", "header row"),
    ("prompt,prompt\na,b\n", "twice"),
])
def test_bad_columns_are_one_line_errors(tmp_path, capsys, content, message):
    (tmp_path / "in.csv").write_text(content)
    code = main(["batch", str(tmp_path / "in.csv"), "--out", str(tmp_path / "out"), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "error: input:" in err[0] and message in err[0], err


@pytest.mark.parametrize("argv, param", [
    (["/no/such/input.csv"], "input"),
    (["{csv}", "--num-images", "2"], "num_images"),
    (["{csv}", "--batch-size", "0"], "batch_size"),
    (["{csv}", "--concurrency", "4"], "concurrency"),
    (["{csv}", "--deployment", "nope", "--concurrency", "0"], "concurrency"),
    (["{csv}", "--steps", "0"], "steps"),
    (["{csv}", "--deployment", "d", "--dtype", "bf16"], "deployment"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, argv, param):
    write_csv(tmp_path / "in.csv", ["prompt"], [["a red circle"]])
    argv = [a.replace("{csv}", str(tmp_path / "in.csv")) for a in argv]
    code = main(["batch", *argv, "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"error: {param}" in err[0], err


def test_rerun_with_other_options_is_refused(straight, twenty, capsys):
    code = main(["batch", str(twenty), "--out", str(straight), "--model", "fastsd-shapes", "--steps", "7", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "steps=6" in err and "steps=7" in err


def test_batch_through_a_deployment(shapes_deployment, twenty, straight, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastsd.cli", "batch", str(twenty), "--out", str(out),
                           "--deployment", shapes_deployment["name"], "--steps", "6"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "requests in flight" in proc.stderr
    assert read_predictions(out) == read_predictions(straight)
    for line in read_predictions(out):  # the same seeds and prompts; batches differ, so rounding may too
        a = np.asarray(Image.open(out / line[2]), np.int16)
        b = np.asarray(Image.open(straight / line[2]), np.int16)
        assert np.abs(a - b).max() <= 2, line


# -- image-to-image, inpainting and LoRA columns ---------------------------------------------------------
def _scene_files(folder: Path):
    """A red circle on blue (64x64) and a mask of its bottom right quarter, as files and as base64."""
    import base64
    import io
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 64), (30, 70, 225))
    from PIL import ImageDraw
    ImageDraw.Draw(image).ellipse([20, 20, 44, 44], fill=(220, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 32, 64, 64))
    image.save(folder / "circle.png")
    mask.save(folder / "corner.png")
    Image.new("L", (32, 32), 255).save(folder / "small-mask.png")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return image, mask, base64.b64encode(buf.getvalue()).decode()


IMAGE_HEADER = ["prompt", "seed", "image", "mask_image", "strength", "lora"]


def test_image_mask_strength_and_lora_columns_locally(tmp_path, shapes_lora_dir, capsys):
    image, mask, b64 = _scene_files(tmp_path / "in" / "pics")
    rows = [
        ["a blue circle on a red background", "5", "", "", "", ""],                    # 0 text-to-image
        ["a blue circle on a blue background", "5", "pics/circle.png", "", "0.75", ""],  # 1 image-to-image, a path
        ["a blue circle on a blue background", "5", b64, "", "0.75", ""],              # 2 the same image, base64
        ["a yellow square on a blue background", "6", "pics/circle.png", "pics/corner.png", "", ""],  # 3 inpainting
        ["a blue circle on a red background", "5", "", "", "", "speckle:1.0"],         # 4 text-to-image + LoRA
        ["a red circle", "1", "pics/missing.png", "", "", ""],                          # 5 no such file
        ["a red circle", "1", "bm90IGFuIGltYWdl", "", "", ""],                          # 6 base64 of text
        ["a red circle", "1", "", "pics/corner.png", "", ""],                           # 7 a mask without an image
        ["a red circle", "1", "pics/circle.png", "pics/small-mask.png", "", ""],        # 8 mask of another size
        ["a red circle", "1", "pics/circle.png", "", "1.5", ""],                        # 9 strength out of range
        ["a red circle", "1", "", "", "0.5", ""],                                       # 10 strength without image
        ["a red circle", "1", "", "", "", "nope:1"],                                    # 11 an adapter not there
    ]
    csv_path = write_csv(tmp_path / "in" / "rows.csv", IMAGE_HEADER, rows)
    out = tmp_path / "out"
    code = main(["batch", str(csv_path), "--out", str(out), "--model", "fastsd-shapes", "--steps", "8",
                 "--lora-dir", str(shapes_lora_dir), "--quiet"])
    assert code == 1
    assert [int(r[0]) for r in read_predictions(out)] == [0, 1, 2, 3, 4]
    with open(out / "errors.csv", newline="") as f:
        errors = {int(e["row_number_per_file"]): e["error"] for e in csv.DictReader(f)}
    assert sorted(errors) == [5, 6, 7, 8, 9, 10, 11]
    want = {5: ("image", "no such file"), 6: ("image", "not an image"), 7: ("mask_image", "only together with"),
            8: ("mask_image", "64x64"), 9: ("strength", "(0, 1]"), 10: ("strength", "only together with"),
            11: ("lora", "speckle")}
    for n, (column, words) in want.items():
        # one line naming the parameter, what is allowed, and where: the file, the row and the column
        assert errors[n].startswith(f"{column}:") and words in errors[n], errors[n]
        if n != 11:  # 11 fails when it runs (the engine's LoRA names); the others when the CSV is read
            assert f"rows.csv row {n}, column '{column}'" in errors[n], errors[n]
    err = capsys.readouterr().err
    assert "7 failed" in err
    png = {n: np.asarray(Image.open(out / f"rows-{n}.png"), np.int16) for n in range(5)}
    assert np.abs(png[1] - png[2]).max() <= 2  # a path and base64 of the same image: the same image-to-image

    from fastsd import load_model, optimize
    engine = optimize(load_model("fastsd-shapes"))
    kw = dict(num_inference_steps=8, progress=False)
    ref = {1: engine.generate(rows[1][0], image=image, strength=0.75, seed=5, **kw).images[0],
           3: engine.generate(rows[3][0], image=image, mask_image=mask, seed=6, **kw).images[0],
           0: engine.generate(rows[0][0], seed=5, **kw).images[0]}
    for n, im in ref.items():  # each row ran the task its columns asked for, with its seed and strength
        assert np.abs(png[n] - np.asarray(im, np.int16)).max() <= 2, n
    assert np.abs(png[4] - png[0]).max() > 10  # the LoRA row was drawn with the adapter fused
    # inpainting kept the pixels outside the mask close to the input; image-to-image did not have to
    from fastsd.judge import mask_array, psnr
    keep = ~mask_array(mask)
    assert psnr(Image.open(out / "rows-3.png"), image, keep) > psnr(Image.open(out / "rows-1.png"), image, keep)


def test_lora_column_without_a_lora_dir_fails_its_row(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", ["prompt", "lora"], [["a red circle", ""], ["a red circle", "speckle"]])
    code = main(["batch", str(csv_path), "--out", str(tmp_path / "out"), *ARGS])
    assert code == 1 and [r[0] for r in read_predictions(tmp_path / "out")] == ["0"]
    error = (tmp_path / "out" / "errors.csv").read_text()
    assert "lora: got 'speckle'" in error and "--lora-dir" in error


def test_image_and_lora_rows_through_a_deployment(shapes_deployment, tmp_path):
    """The same columns sent to a live deployment: images through MII's InpaintingReply, `lora` by name from
    the deployment's --lora-dir; an adapter it does not have fails that row only."""
    _, _, b64 = _scene_files(tmp_path / "in" / "pics")
    rows = [["a blue circle on a blue background", "5", b64, "", "0.75", ""],
            ["a yellow square on a blue background", "6", "pics/circle.png", "pics/corner.png", "", ""],
            ["a blue circle on a red background", "5", "", "", "", "speckle:1.0"],
            ["a blue circle on a red background", "5", "", "", "", "nope"]]
    csv_path = write_csv(tmp_path / "in" / "rows.csv", IMAGE_HEADER, rows)
    local, remote = tmp_path / "local", tmp_path / "remote"
    proc = subprocess.run([sys.executable, "-m", "fastsd.cli", "batch", str(csv_path), "--out", str(remote),
                           "--deployment", shapes_deployment["name"], "--steps", "8"],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert [int(r[0]) for r in read_predictions(remote)] == [0, 1, 2]
    error = (remote / "errors.csv").read_text()
    assert "INVALID_ARGUMENT" in error and "lora" in error and "speckle" in error, error
    write_csv(tmp_path / "in" / "local.csv", IMAGE_HEADER, rows[:3])
    assert main(["batch", str(tmp_path / "in" / "local.csv"), "--out", str(local), "--model", "fastsd-shapes",
                 "--steps", "8", "--lora-dir", shapes_deployment["lora_dir"], "--quiet"]) == 0
    for n in range(3):  # the deployment drew what the local engine draws from the same row
        a = np.asarray(Image.open(remote / f"rows-{n}.png"), np.int16)
        b = np.asarray(Image.open(local / f"local-{n}.png"), np.int16)
        assert np.abs(a - b).max() <= 2, n
