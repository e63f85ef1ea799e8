"""python -m fastsd.bench.ops: the per-op profile of a speed profile's UNet step."""
import json

from fastsd.bench.ops import main


def test_top_ops_of_the_tiny_unet_step(tmp_path, capsys):
    out = tmp_path / "ops.json"
    assert main(["--model", "tiny", "--profile", "exact", "--threads", "1", "--top", "5", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    shares = [r["share"] for r in info["top"]]
    assert len(shares) == 5 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-9
    assert any(r["op"] == "aten::mkldnn_convolution" or "conv" in r["op"] for r in info["top"])
    assert info["wall_s"] > 0 and info["shapes"]["sample"] == [2, 4, 8, 8]
    assert "self CPU ms" in capsys.readouterr().out


def test_bad_profile_is_one_line_exit_2(capsys):
    assert main(["--profile", "quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "profile" in err[0] and "allowed: exact, fast, fastest" in err[0]
