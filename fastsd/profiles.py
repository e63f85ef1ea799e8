"""Speed profiles: which OptimizeConfig flags to use, per class of device, so a user need not know them.

- exact:   FP32, the plainest path (the default): bit-identical to diffusers.
- fast:    the fastest configuration measured on that class of device that stays within verify's
           bf16/fp16 tolerance.
- fastest: adds what trades more fidelity for speed (step caching), within the looser tolerance `verify`
           states for it (fastsd.reference.APPROXIMATE).

The table is data, filled from measurements (README, "Speed profiles"); a profile names only the flags
it changes, and flags a user gives explicitly win over the profile's."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import InvalidParameter

PROFILE_NAMES = ("exact", "fast", "fastest")
DEVICE_CLASSES = ("cpu-amx", "cpu-avx512-bf16", "cpu", "cuda")

# Measured side by side in one `fastsd bench` run (bench/RESULTS.md of 2026-12-02, SD 1.4 at 512, AMX Xeon, 2
# threads): UNet step diffusers FP32 8.93 s, torch bf16 recipe 2.42 s, OpenVINO bf16 static 2.09 s (45.0 dB), so
# `fast` runs the openvino backend there (torch bf16 where openvino is not installed). On Zen 4 (AVX-512 BF16,
# no AMX), one run of 2026-12-07 (SD 1.4 at 512, 1 thread): UNet step diffusers FP32 22.3 s, openvino bf16
# static 8.9 s (2.50x, 46.7 dB), torch bf16 recipe 12.6 s (1.77x, 47.9 dB), so openvino there too. On a CPU
# without native bf16, bf16 is emulated and not measured faster, so `fast` stays FP32 there.
# `fastest` adds step caching every 3rd step (fastsd/step_cache.py) on the torch backend, the only one that
# can cut the UNet: 1.28 s per step averaged over a cycle on the AMX Xeon (1.63x OpenVINO's step, 32.8 dB),
# judged at the APPROXIMATE tolerance.
# CUDA: fp16 with torch's flash SDPA is the standard fast path (not timed here: no GPU was lent).
PROFILES: dict[str, dict[str, dict]] = {
    "exact": {c: {} for c in DEVICE_CLASSES},
    "fast": {
        "cpu-amx": {"backend": "openvino", "dtype": "bf16"},
        "cpu-avx512-bf16": {"backend": "openvino", "dtype": "bf16"},
        "cpu": {},
        "cuda": {"dtype": "fp16"},
    },
    "fastest": {
        "cpu-amx": {"dtype": "bf16", "cache_interval": 3},
        "cpu-avx512-bf16": {"dtype": "bf16", "cache_interval": 3},
        "cpu": {"cache_interval": 3},
        "cuda": {"dtype": "fp16", "cache_interval": 3},
    },
}
# Where a profile names a backend whose package is missing, the same flags run on the torch backend.
OPTIONAL_BACKENDS = {"openvino": "openvino"}


def backend_installed(name: str) -> bool:
    import importlib.util
    package = OPTIONAL_BACKENDS.get(name)
    return package is None or importlib.util.find_spec(package) is not None


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_device(device: str) -> str:
    """`auto`: CUDA when torch sees a device, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_class(device: str) -> str:
    """cuda, or the CPU's kind: AMX (bf16 tiles), AVX-512 BF16 only, or neither."""
    if resolve_device(device).startswith("cuda"):
        return "cuda"
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "cpu-amx"
    if "avx512_bf16" in flags:
        return "cpu-avx512-bf16"
    return "cpu"


def profile_flags(profile: str, device: str = "auto") -> dict:
    """The OptimizeConfig flags `profile` sets on `device` (device itself included, resolved)."""
    if profile not in PROFILES:
        raise InvalidParameter("profile", profile, ", ".join(PROFILE_NAMES))
    dev = resolve_device(device)
    flags = dict(PROFILES[profile][device_class(dev)])
    if not backend_installed(flags.get("backend", "torch")):
        flags.pop("backend")
    return {"device": dev, **flags}
