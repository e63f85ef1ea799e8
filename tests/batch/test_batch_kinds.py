"""`fastsd batch` with a depth model (a `depth_map` column, or its DPT) and with the x4 upscaler (a
`noise_level` column, 4x outputs): the rows' images equal the engine's own; bad values fail their row."""
import csv

import numpy as np
from PIL import Image

from fastsd.cli import main
from fastsd.verify_kinds import sample_depth_map, sample_image


def write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def errors_of(out):
    with open(out / "errors.csv", newline="") as f:
        return {int(e["row_number_per_file"]): e["error"] for e in csv.DictReader(f)}


def test_depth_and_upscale_batches_locally(tmp_path):
    from fastsd import load_model, optimize
    pics = tmp_path / "in" / "pics"
    pics.mkdir(parents=True)
    sample_image((64, 64)).save(pics / "disc.png")
    sample_image((16, 16)).save(pics / "low.png")
    np.save(pics / "depth.npy", sample_depth_map((64, 64)))
    depth_rows = [["a red disc", "3", "pics/disc.png", "pics/depth.npy", ""],  # 0 a given map
                  ["a red disc", "4", "pics/disc.png", "", ""],                # 1 the model's DPT
                  ["a red disc", "5", "", "pics/depth.npy", ""],               # 2 a map without an image
                  ["a red disc", "5", "pics/disc.png", "pics/none.npy", ""]]   # 3 no such map
    csv_path = write_csv(tmp_path / "in" / "d.csv", ["prompt", "seed", "image", "depth_map", "noise_level"], depth_rows)
    out = tmp_path / "out-d"
    code = main(["batch", str(csv_path), "--out", str(out), "--model", "tiny-depth", "--steps", "3", "--quiet"])
    assert code == 1
    errors = errors_of(out)
    assert sorted(errors) == [2, 3] and errors[2].startswith("depth_map:")
    assert "only together with an image" in errors[2]
    engine = optimize(load_model("tiny-depth"))
    disc = Image.open(pics / "disc.png").convert("RGB")
    for n, dmap in ((0, sample_depth_map((64, 64))), (1, None)):
        want = engine.generate("a red disc", seed=3 + n, image=disc, depth_map=dmap, num_inference_steps=3,
                               progress=False).images[0]
        got = np.asarray(Image.open(out / f"d-{n}.png"), np.int16)
        assert np.abs(got - np.asarray(want, np.int16)).max() <= 2, n

    up_rows = [["a red disc", "7", "pics/low.png", "", "40"],  # 0
               ["a red disc", "8", "pics/low.png", "", ""],    # 1 the default noise level (20)
               ["a red disc", "8", "pics/low.png", "", "x"]]   # 2 not an integer
    csv_path = write_csv(tmp_path / "in" / "u.csv", ["prompt", "seed", "image", "depth_map", "noise_level"], up_rows)
    out = tmp_path / "out-u"
    code = main(["batch", str(csv_path), "--out", str(out), "--model", "tiny-upscaler", "--steps", "3", "--quiet"])
    assert code == 1 and sorted(errors_of(out)) == [2] and errors_of(out)[2].startswith("noise_level:")
    engine = optimize(load_model("tiny-upscaler"))
    low = Image.open(pics / "low.png").convert("RGB")
    for n, level in ((0, 40), (1, None)):
        got = Image.open(out / f"u-{n}.png")
        assert got.size == (64, 64)  # 4x
        want = engine.generate("a red disc", seed=7 + n, image=low, noise_level=level, num_inference_steps=3,
                               progress=False).images[0]
        assert np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16)).max() <= 2, n
