"""Writing graphs and files so that nothing half-written ever looks complete.

Every graph is written inside a staging folder (`.<component>.partial-<pid>`) that is renamed into place
only once the whole export has been written and checked; JSON and Markdown files go to a temporary name
and are renamed. A graph whose tensors pass EXTERNAL_DATA_THRESHOLD is saved with its weights in one
external-data file beside it (`model.onnx.data`): protobuf cannot serialize more than 2 GiB."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

from .errors import DiskFull, WriteFailed

# protobuf's hard limit is 2 GiB; leave room for the graph itself beside the weights.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27


def tensor_bytes(model) -> int:
    """Bytes of the tensors a graph carries (initializers and Constant nodes), without serializing it."""
    import numpy as np
    import onnx

    def size(t) -> int:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            return 0
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        return int(np.prod(t.dims, dtype=np.int64)) * itemsize

    total = sum(size(t) for t in model.graph.initializer)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += size(a.t)
    return total


def _save(model, path: Path, external: bool) -> None:
    """The one place graph bytes hit the disk."""
    import onnx
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def write_failure(e: OSError, what: str) -> Exception:
    """The one-line error for an OSError while writing `what`."""
    if e.errno == errno.ENOSPC:
        return DiskFull(f"out: no space left on the device while writing {what}; the partial files were "
                        "removed (a full-size fp32 export needs about 4 GB free, 6 GB with --optimize)")
    return WriteFailed(f"out: cannot write {what}: {e.strerror or e}")


def write_graph(model, path: Path, threshold: int | None = None) -> dict:
    """Save `model` at `path` (external data when its tensors pass `threshold` bytes), then check the
    file by path, which works beyond 2 GB, and store the inferred shapes. The proto may be emptied
    by the save (external data moves its tensors out); do not use it afterwards."""
    import onnx
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    nbytes = tensor_bytes(model)
    external = nbytes >= threshold
    try:
        _save(model, path, external)
    except OSError as e:
        raise write_failure(e, str(path)) from e
    onnx.checker.check_model(str(path))
    inferred = path.with_name(path.name + ".shapes")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    os.replace(inferred, path)
    files = [path.name] + ([path.name + ".data"] if external else [])
    return {"file": path.name, "external_data": path.name + ".data" if external else None,
            "tensor_bytes": nbytes, "bytes_on_disk": sum((path.parent / f).stat().st_size for f in files)}


def write_text(path: Path, text: str) -> None:
    """Write a small file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_failure(e, str(path)) from e


def write_json(path: Path, data) -> None:
    text = json.dumps(data, indent=2, default=str)
    # shapes on one line: [1, 4, 64, 64] rather than one number per line
    text = re.sub(r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text)
    write_text(path, text + "\n")


def staging_dir(out: Path, name: str) -> Path:
    path = out / f".{name}.partial-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def promote(staging: Path, final: Path) -> None:
    """Rename a finished staging folder into place (replacing an older one)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, final)
