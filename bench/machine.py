"""The machine and the package versions a bench ran on, for its report; the threads it runs on."""
from __future__ import annotations

import json
import os
import platform
import re
from importlib import metadata

import torch

import fastsd
from fastsd.errors import InvalidParameter

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
          "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def machine_info(device: torch.device) -> dict:
    import psutil  # the optional "bench" extra
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
        have = set(m.group(1).split()) if m else set()
        flags = [f for f in _FLAGS if f in have]
    except OSError:
        pass
    onednn = re.search(r"(?:MKL-DNN|oneDNN)\s*v?([\d.]+)", torch.__config__.show())
    info = {
        "cpu": cpu, "cpu_flags": flags, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "onednn": onednn.group(1) if onednn else None, "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "amx": "amx_bf16" in flags,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "openvino", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["fastsd"] = fastsd.__version__
    return out


def set_threads(threads: int | None) -> None:
    """torch's thread count for a bench script's --threads (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise InvalidParameter("threads", threads, "1 or more")
    torch.set_num_threads(threads)


def write_json(path: str | None, info: dict) -> None:
    """A bench script's figures as JSON (--json), when a path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(info, f, indent=2, default=str)
