"""Speed profiles: the table per device class, explicit flags over the profile, --device auto."""
import pytest

from fastsd import OptimizeConfig, optimize
from fastsd import profiles
from fastsd.errors import InvalidParameter
from fastsd.options import optimize_config
from fastsd.cli import build_parser


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
