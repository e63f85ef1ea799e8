"""Reading a batch's input: a CSV file, or a folder of CSV files, with a `prompt` column.

Column problems (no `prompt`, a column no task reads) stop the batch before anything runs; a bad value
in one row (an empty prompt, a seed that is not an integer, an unreadable image) fails that row only
(`Row.error`, which names the file, the row and the column).

`image` and `mask_image` hold a file path (relative to the CSV file's folder, or absolute) or a base64
PNG/JPEG/WebP (a data: URL too); an image makes the row image-to-image, with a mask inpainting (white =
repaint). Each image is read and checked here and read again when its row runs, so a large batch never
holds every image in memory. `strength` is a number in (0, 1]; `lora` names adapters as a deployment's
`lora` keyword does, NAME[:SCALE][,NAME[:SCALE]] (the deployment's --lora-dir, or the batch's own).
With a depth model, `depth_map` names a grayscale PNG or .npy file (local batches; else the model's own
estimator); with the x4 upscaler, `noise_level` is an integer (default 20) and the output is 4x the image."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from .. import images as imgs
from .. import validation as check
from ..errors import InvalidParameter

REQUIRED = ("prompt",)
# Columns a row may carry.
OPTIONAL = ("negative_prompt", "seed", "image", "mask_image", "strength", "lora", "depth_map", "noise_level")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Row:
    csv_name: str          # the input file's name, as predictions.csv's input_csv_name
    number: int            # 0-based data row in its file (row_number_per_file)
    prompt: str
    negative_prompt: str | None
    seed: int | None
    error: str | None = None  # set when the row cannot run; it goes to errors.csv
    image: tuple[str, str] | None = None  # ("file", path) or ("base64", text), checked; read by load_images()
    mask_image: tuple[str, str] | None = None
    strength: float | None = None
    lora: str | None = None        # NAME[:SCALE][,...] as given
    size: tuple[int, int] | None = None  # the image's (width, height)
    depth_map: str | None = None  # a depth model's map: a PNG or .npy file, resolved and checked
    noise_level: int | None = None  # the x4 upscaler's

    @property
    def key(self) -> tuple[str, int]:
        return (self.csv_name, self.number)

    @property
    def task(self) -> str:
        return "text2img" if self.image is None else "img2img" if self.mask_image is None else "inpaint"

    def load_images(self):
        """(image, mask): PIL images, or None where the row has none."""
        return (None if self.image is None else read_image(self.image, "image"),
                None if self.mask_image is None else read_image(self.mask_image, "mask_image", mode="L"))

    def encoded_images(self):
        """(image, mask) as encoded bytes for a deployment (re-encoded as PNG: the checks ran on the decode)."""
        image, mask = self.load_images()
        return (None if image is None else imgs.encode_png(image), None if mask is None else imgs.encode_png(mask))

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
                    rows.append(_row(f.name, i, record, f.parent))
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


def image_source(value: str, column: str, folder: Path) -> tuple[str, str]:
    """A cell of `image` or `mask_image` -> ("file", resolved path) or ("base64", the text as given)."""
    value = value.strip()
    if not value.startswith("data:") and len(value) < 4096:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else folder / path
        if path.is_file():
            return ("file", str(path.resolve()))
        if value.lower().endswith(IMAGE_SUFFIXES):
            raise InvalidParameter(column, value, f"an image file (relative to {folder}) or a base64 image: "
                                                  "no such file")
    return ("base64", value)


def read_image(source: tuple[str, str], column: str, mode: str = "RGB"):
    kind, value = source
    if kind == "file":
        return imgs.read_file(value, column, mode=mode)
    return imgs.decode_base64(value, column, mode=mode)


def _strength(text: str) -> float:
    from ..tasks import strength_value  # torch: only rows with a strength need it
    try:
        value = float(text)
    except ValueError:
        raise InvalidParameter("strength", text, "a number in (0, 1]: how much of the image is repainted") from None
    return strength_value(value)


def _row(csv_name: str, number: int, record: dict, folder: Path = Path(".")) -> Row:
    if None in record:  # more values than columns
        return Row(csv_name, number, record.get("prompt") or "", None, None,
                   error=f"row has {len(record) - 1 + len(record[None])} values for {len(record) - 1} columns")
    prompt = record.get("prompt") or ""
    negative = record.get("negative_prompt") or None
    seed, error = None, None
    raw_seed = (record.get("seed") or "").strip()
    row = Row(csv_name, number, prompt, negative, None)
    column = "prompt"
    try:
        check.prompts(prompt)
        column = "seed"
        if raw_seed:
            try:
                value = int(raw_seed)
            except ValueError:
                raise InvalidParameter("seed", raw_seed, f"an integer in [0, {check.MAX_SEED}]") from None
            seed = check.seeds(value, 1)[0]
        row.seed = seed
        for column in ("image", "mask_image"):
            text = (record.get(column) or "").strip()
            if text:
                setattr(row, column, image_source(text, column, folder))
        column = "mask_image"
        if row.mask_image is not None and row.image is None:
            raise InvalidParameter("mask_image", "a mask", "a mask only together with an image (an 'image' value)")
        column = "strength"
        raw_strength = (record.get("strength") or "").strip()
        if raw_strength:
            if row.image is None:
                raise InvalidParameter("strength", raw_strength, "a strength only together with an image")
            row.strength = _strength(raw_strength)
        column = "lora"
        row.lora = (record.get("lora") or "").strip() or None
        column = "depth_map"
        raw_depth = (record.get("depth_map") or "").strip()
        if raw_depth:
            if row.image is None:
                raise InvalidParameter("depth_map", raw_depth, "a depth map only together with an image")
            from ..depth import read_depth_map  # torch: only rows with a depth map need it
            path = Path(raw_depth).expanduser()
            row.depth_map = str(path if path.is_absolute() else folder / path)
            read_depth_map(row.depth_map)
        column = "noise_level"
        raw_level = (record.get("noise_level") or "").strip()
        if raw_level:
            if row.image is None:
                raise InvalidParameter("noise_level", raw_level, "a noise level only together with an image")
            try:
                row.noise_level = int(raw_level)
            except ValueError:
                raise InvalidParameter("noise_level", raw_level, "an integer in [0, 350]") from None
            if not 0 <= row.noise_level <= 350:
                raise InvalidParameter("noise_level", raw_level, "an integer in [0, 350]")
        for column in ("image", "mask_image"):  # read now, so a bad image fails its row before anything runs
            if getattr(row, column) is not None:
                size = read_image(getattr(row, column), column, "L" if column == "mask_image" else "RGB").size
                if column == "image":
                    row.size = size
                elif size != row.size:
                    raise InvalidParameter("mask_image", f"{size[0]}x{size[1]}",
                                           f"the image's size {row.size[0]}x{row.size[1]}")
    except InvalidParameter as e:
        error = f"{e} ({csv_name} row {number}, column {column!r})"
    row.error = error
    return row
