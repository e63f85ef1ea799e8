"""Speed profiles: the table per device class, explicit flags over the profile, --device auto, verify --profile."""
import json

import pytest

from fastsd import OptimizeConfig, optimize
from fastsd import profiles
from fastsd.errors import InvalidParameter
from fastsd.options import optimize_config
from fastsd.cli import build_parser, main


@pytest.mark.parametrize("flags, expected", [
    ({"amx_bf16", "avx512_bf16"}, "cpu-amx"), ({"avx512_bf16"}, "cpu-avx512-bf16"), ({"avx2"}, "cpu")])
def test_device_class_reads_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset(flags))
    assert profiles.device_class("cpu") == expected


def test_every_profile_covers_every_device_class():
    for name in profiles.PROFILE_NAMES:
        assert set(profiles.PROFILES[name]) == set(profiles.DEVICE_CLASSES)
    assert profiles.PROFILES["exact"]["cpu-amx"] == {}


def test_fast_on_a_bf16_cpu_is_the_bf16_recipe(monkeypatch):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    cfg = OptimizeConfig.from_profile("fast", device="cpu").validated()
    assert cfg.dtype == "bf16" and cfg.device == "cpu"
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"avx2"}))
    assert OptimizeConfig.from_profile("fast", device="cpu").dtype == "fp32"


def test_device_auto_is_the_cpu_without_cuda():
    assert OptimizeConfig().validated().device == "cpu"  # no CUDA on the test machines


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(InvalidParameter, match="profile"):
        OptimizeConfig.from_profile("turbo")


def test_cli_flags_win_over_the_profile(monkeypatch):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    args = build_parser().parse_args(["generate", "x", "--profile", "fast", "--dtype", "fp32"])
    assert optimize_config(args).dtype == "fp32"
    args = build_parser().parse_args(["generate", "x", "--profile", "fast"])
    assert optimize_config(args).dtype == "bf16"
    args = build_parser().parse_args(["generate", "x"])
    assert optimize_config(args).dtype == "fp32" and optimize_config(args).device == "cpu"


def test_optimize_takes_a_profile(monkeypatch):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    engine = optimize("tiny", profile="fast")
    assert engine.config.dtype == "bf16"
    with pytest.raises(InvalidParameter, match="profile"):
        optimize("tiny", OptimizeConfig(), profile="fast")


@pytest.mark.parametrize("flags", [{"amx_bf16", "avx512_bf16"}, {"avx512_bf16"}])
def test_fast_on_a_native_bf16_cpu_runs_openvino_where_installed(monkeypatch, flags):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(profiles, "backend_installed", lambda name: True)
    assert profiles.profile_flags("fast", "cpu") == {"device": "cpu", "backend": "openvino", "dtype": "bf16"}
    monkeypatch.setattr(profiles, "backend_installed", lambda name: name != "openvino")
    assert profiles.profile_flags("fast", "cpu") == {"device": "cpu", "dtype": "bf16"}  # torch bf16 instead


def test_fastest_adds_step_caching_on_every_class(monkeypatch):
    for cls in profiles.DEVICE_CLASSES:
        assert profiles.PROFILES["fastest"][cls].get("cache_interval", 1) > 1
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    cfg = OptimizeConfig.from_profile("fastest", device="cpu").validated()
    assert cfg.backend == "torch" and cfg.dtype == "bf16" and cfg.cache_interval == 3
    from fastsd.reference import APPROXIMATE, TOLERANCES, tolerance_for
    assert tolerance_for(cfg) == APPROXIMATE and APPROXIMATE.min_psnr < TOLERANCES["bf16"].min_psnr


def test_cli_backend_comes_from_the_profile_unless_given(monkeypatch):
    monkeypatch.setattr(profiles, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.setattr(profiles, "backend_installed", lambda name: True)
    assert optimize_config(build_parser().parse_args(["generate", "x", "--profile", "fast"])).backend == "openvino"
    args = build_parser().parse_args(["generate", "x", "--profile", "fast", "--backend", "torch"])
    assert optimize_config(args).backend == "torch" and optimize_config(args).dtype == "bf16"
    assert optimize_config(build_parser().parse_args(["generate", "x"])).backend == "torch"


@pytest.mark.parametrize("profile", ["exact", "fastest"])
def test_verify_profile_holds_the_profile_to_its_tolerance(capsys, tmp_path, profile):
    out = tmp_path / "v.json"
    code = main(["verify", "--model", "tiny", "--steps", "6", "--profile", profile, "--quiet", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    report = json.loads(out.read_text())
    if profile == "exact":
        assert report["tolerance"]["name"] == "fp32"
        assert all(i["identical"] for i in report["images"])  # exact stays bit-identical to diffusers
    else:
        assert report["tolerance"]["name"].startswith("approximate") and report["config"]["cache_interval"] == 3


def test_verify_profile_fast_here(capsys, tmp_path):
    """On this machine `fast` resolves to what the table says for its CPU; it passes at the bf16 tolerance."""
    pytest.importorskip("openvino")
    out = tmp_path / "v.json"
    code = main(["verify", "--model", "tiny", "--steps", "4", "--profile", "fast", "--quiet", "--json", str(out)])
    assert code == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    flags = profiles.profile_flags("fast", "cpu")
    assert report["engine"]["backend"] == flags.get("backend", "torch")
    assert report["tolerance"]["name"] == flags.get("dtype", "fp32")
