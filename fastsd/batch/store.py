"""A batch's output folder, written so that a crash at any moment loses nothing and leaves nothing half
written, and a second run picks up where the first stopped.

    DIR/<csv stem>-<row>.png   one image per row
    DIR/predictions.csv        no header (as the Azure ML batch endpoint writes it), one line per row done:
                               row_number_per_file, prompt, generated_image, nsfw_content_detected, input_csv_name
    DIR/errors.csv             header, one line per row that failed: input_csv_name, row_number_per_file, prompt, error
    DIR/.fastsd-batch.json     the options the images were made with; a rerun with other options is refused

Every file is written to a temporary name in DIR and renamed over the old one (a rename is atomic on one
file system), the image first and its line after: a row is done when its line is in predictions.csv, and
its image is then complete. The lines are kept in input order, so an interrupted and resumed batch ends
with the same files as one that ran straight through.

A full disk (or quota) is `OutputFull`: the file being written is removed, nothing half written is left
or recorded as done, and the command says so in one line (exit 4); run it again once there is room.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
from pathlib import Path

from ..errors import FastSDError, InvalidParameter
from .inputs import Row

PREDICTIONS = "predictions.csv"
ERRORS = "errors.csv"
OPTIONS = ".fastsd-batch.json"
PREDICTION_COLUMNS = ("row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name")
ERROR_COLUMNS = ("input_csv_name", "row_number_per_file", "prompt", "error")


FULL = (errno.ENOSPC, errno.EDQUOT)


class OutputFull(FastSDError):
    """The output folder's file system has no room left (or the user's quota is used up)."""


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # never a half-written file, under any name
        if e.errno in FULL:
            raise OutputFull(f"out: no space left in {path.parent} ({os.strerror(e.errno).lower()}) while writing "
                             f"{path.name}; the rows done so far are kept: free some space and run the same "
                             "command again to resume") from None
        raise


class OutputStore:
    def __init__(self, out: str, rows: list[Row], options: dict):
        self.dir = Path(out).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidParameter("out", out, f"a folder fastsd can create and write ({e.strerror})") from None
        if not os.access(self.dir, os.W_OK):
            raise InvalidParameter("out", out, "a writable folder")
        for stale in self.dir.glob(".*.tmp"):  # what a killed run was writing; never a finished file
            stale.unlink(missing_ok=True)
        self.order = {r.key: i for i, r in enumerate(rows)}
        self._check_options(options)
        self.predictions: dict[tuple[str, int], list[str]] = {}
        self.errors: dict[tuple[str, int], list[str]] = {}
        self._load(rows)

    # -- resume --------------------------------------------------------------------------------------
    def _check_options(self, options: dict) -> None:
        path = self.dir / OPTIONS
        if path.exists():
            try:
                before = json.loads(path.read_text())
            except ValueError:
                before = None
            if before is not None and before != options:
                diff = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
                k = diff[0]
                raise InvalidParameter("out", str(self.dir), f"a folder of a batch run with the same options, or a "
                                       f"new one (it holds images made with {k}={before.get(k)!r}, this run asks "
                                       f"for {k}={options.get(k)!r})")
        atomic_write(path, json.dumps(options, indent=1, sort_keys=True).encode())

    def _load(self, rows: list[Row]) -> None:
        """Rows already done: a line in predictions.csv for the same prompt, whose image is there."""
        by_key = {r.key: r for r in rows}
        path = self.dir / PREDICTIONS
        if not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as f:
            for line in csv.reader(f):
                if len(line) != len(PREDICTION_COLUMNS) or not line[0].isdigit():
                    continue
                key = (line[4], int(line[0]))
                row = by_key.get(key)
                if row is not None and row.prompt == line[1] and (self.dir / line[2]).is_file():
                    self.predictions[key] = line

    def is_done(self, row: Row) -> bool:
        return row.key in self.predictions

    # -- writing -------------------------------------------------------------------------------------
    def save_image(self, row: Row, image) -> None:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write(self.dir / row.image_name, buf.getvalue())

    def done(self, row: Row, nsfw: bool) -> None:
        """Records a row whose image `save_image` wrote. Call `flush` to make it durable."""
        self.predictions[row.key] = [str(row.number), row.prompt, row.image_name, str(bool(nsfw)), row.csv_name]
        self.errors.pop(row.key, None)

    def failed(self, row: Row, error: str) -> None:
        self.errors[row.key] = [row.csv_name, str(row.number), row.prompt, error]
        self.predictions.pop(row.key, None)

    def flush(self) -> None:
        atomic_write(self.dir / PREDICTIONS, self._csv(self.predictions, header=None))
        if self.errors or (self.dir / ERRORS).exists():
            atomic_write(self.dir / ERRORS, self._csv(self.errors, header=ERROR_COLUMNS))

    def _csv(self, lines: dict, header) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(header)
        for key in sorted(lines, key=lambda k: self.order.get(k, len(self.order))):
            w.writerow(lines[key])
        return buf.getvalue().encode("utf-8")
