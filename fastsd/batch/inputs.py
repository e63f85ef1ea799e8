"""Reading a batch's input: a CSV file, or a folder of CSV files, with a `prompt` column.

Column problems (no `prompt`, a column no task reads) stop the batch before anything runs; a bad value
in one row (an empty prompt, a seed that is not an integer) fails that row only (`Row.error`)."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .. import validation as check
from ..errors import InvalidParameter

REQUIRED = ("prompt",)
# Columns a row may carry. Image-to-image and inpainting add `image` and `mask_image` here when they land.
OPTIONAL = ("negative_prompt", "seed")


@dataclass
class Row:
    csv_name: str          # the input file's name, as predictions.csv's input_csv_name
    number: int            # 0-based data row in its file (row_number_per_file)
    prompt: str
    negative_prompt: str | None
    seed: int | None
    error: str | None = None  # set when the row cannot run; it goes to errors.csv

    @property
    def key(self) -> tuple[str, int]:
        return (self.csv_name, self.number)

    @property
    def image_name(self) -> str:
        return f"{Path(self.csv_name).stem}-{self.number}.png"


def input_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise InvalidParameter("input", path, "a .csv file or a folder of .csv files")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".csv")
        if not files:
            raise InvalidParameter("input", path, "a folder holding at least one .csv file (it holds none)")
        return files
    raise InvalidParameter("input", path, "an existing .csv file or folder of .csv files")


def read_rows(path: str, optional: tuple[str, ...] = OPTIONAL) -> list[Row]:
    """Every row of every input file, in file then row order."""
    rows: list[Row] = []
    files = input_files(path)
    for f in files:
        try:
            with open(f, newline="", encoding="utf-8-sig") as fh:  # -sig: a BOM from a spreadsheet is not a column
                reader = csv.DictReader(fh)
                columns = [c.strip() for c in (reader.fieldnames or [])]
                _check_columns(f.name, columns, optional)
                reader.fieldnames = columns
                for i, record in enumerate(reader):
                    rows.append(_row(f.name, i, record))
        except (UnicodeDecodeError, csv.Error) as e:
            raise InvalidParameter("input", str(f), f"a UTF-8 CSV file ({type(e).__name__}: {e})") from None
    return rows


def _check_columns(name: str, columns: list[str], optional: tuple[str, ...]) -> None:
    allowed = (*REQUIRED, *optional)
    if not columns:
        raise InvalidParameter("input", name, "a CSV file with a header row naming its columns (it is empty)")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise InvalidParameter("input", name, f"a CSV with a {missing[0]!r} column (its columns: "
                                              f"{', '.join(columns)})")
    extra = [c for c in columns if c not in allowed]
    if extra:
        raise InvalidParameter("input", name, f"columns among {', '.join(allowed)} (unknown column {extra[0]!r})")
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise InvalidParameter("input", name, f"each column once ({dup[0]!r} is there twice)")


def _row(csv_name: str, number: int, record: dict) -> Row:
    if None in record:  # more values than columns
        return Row(csv_name, number, record.get("prompt") or "", None, None,
                   error=f"row has {len(record) - 1 + len(record[None])} values for {len(record) - 1} columns")
    prompt = record.get("prompt") or ""
    negative = record.get("negative_prompt") or None
    seed, error = None, None
    raw_seed = (record.get("seed") or "").strip()
    try:
        check.prompts(prompt)
        if raw_seed:
            try:
                value = int(raw_seed)
            except ValueError:
                raise InvalidParameter("seed", raw_seed, f"an integer in [0, {check.MAX_SEED}]") from None
            seed = check.seeds(value, 1)[0]
    except InvalidParameter as e:
        error = str(e)
    return Row(csv_name, number, prompt, negative, seed, error)
