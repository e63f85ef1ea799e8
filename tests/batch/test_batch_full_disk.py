"""`fastsd batch` when the output folder's disk fills up (issue 24, item 9): one line naming the folder and
the lack of space, exit 4, nothing half written left or recorded as done, and a rerun resumes to the same
files. The full disk is the file system's own error (ENOSPC), raised by fsync after a number of files."""
import csv
import errno
import os

import pytest
from PIL import Image

from fastsd.batch import store
from fastsd.cli import main

ARGS = ["--model", "fastsd-shapes", "--steps", "2", "--quiet", "--batch-size", "1"]


def test_full_disk_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt"])
        w.writerows([[f"a red circle on a blue background {i}"] for i in range(4)])
    out = tmp_path / "out"
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 4:  # the options file, then image 0, predictions, image 1, predictions: then full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)
    monkeypatch.setattr(store.os, "fsync", fsync)
    code = main(["batch", str(src), "--out", str(out), *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4, err
    assert err[-1].startswith("fastsd batch: error: out: no space left in ") and str(out) in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not list(out.glob(".*.tmp"))  # nothing half written under any name
    done = list(csv.reader(open(out / "predictions.csv")))
    assert len(done) == 1  # the row whose image and line were both written
    for line in done:
        Image.open(out / line[2]).load()  # a complete image for every row recorded as done
    monkeypatch.setattr(store.os, "fsync", real_fsync)
    assert main(["batch", str(src), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    rows = list(csv.reader(open(out / "predictions.csv")))
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    for line in rows:
        Image.open(out / line[2]).load()


def test_other_write_errors_are_not_called_full(tmp_path, monkeypatch):
    def fsync(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(store.os, "fsync", fsync)
    with pytest.raises(OSError) as e:
        store.atomic_write(tmp_path / "x.png", b"data")
    assert e.value.errno == errno.EIO and not list(tmp_path.iterdir())
