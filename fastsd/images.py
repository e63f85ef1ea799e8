"""Reading images a user or a client hands over (a file, encoded bytes, base64) into PIL images, with
the limits a server needs: bytes, formats, and pixels checked from the header, so that a decompression
bomb is refused before it is decoded. Every failure is an InvalidParameter naming the field."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

from PIL import Image

from .errors import InvalidParameter

FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_MAX_BYTES = 8 * 2**20
DEFAULT_MAX_PIXELS = 4096 * 4096


def decode(data: bytes, name: str = "image", *, max_bytes: int = DEFAULT_MAX_BYTES,
           max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "RGB") -> Image.Image:
    """Encoded PNG/JPEG/WebP bytes -> a loaded PIL image in `mode`."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise InvalidParameter(name, type(data).__name__, "encoded image bytes (PNG, JPEG or WebP)")
    if len(data) > max_bytes:
        raise InvalidParameter(name, f"{len(data)} bytes", f"at most {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise InvalidParameter(name, f"{w}x{h} pixels", f"at most {max_pixels} pixels")
            im.load()
    except InvalidParameter:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidParameter(name, "an oversized image", f"at most {max_pixels} pixels ({e})") from None
    except Image.UnidentifiedImageError:
        raise InvalidParameter(name, "data that is not an image", f"a {', '.join(FORMATS)} image") from None
    except Exception as e:  # PIL raises many types for corrupt or unknown data
        raise InvalidParameter(name, "unreadable image data", f"a valid {', '.join(FORMATS)} image "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})") from None
    return im.convert(mode)


def decode_base64(text, name: str = "image", **limits) -> Image.Image:
    if not isinstance(text, str) or not text:
        raise InvalidParameter(name, type(text).__name__, "a base64-encoded PNG, JPEG or WebP image")
    if text.startswith("data:") and "," in text:  # a data URL: data:image/png;base64,....
        text = text.split(",", 1)[1]
    max_bytes = limits.get("max_bytes", DEFAULT_MAX_BYTES)
    if len(text) > 4 * (max_bytes // 3 + 1):
        raise InvalidParameter(name, f"{len(text)} base64 characters", f"an image of at most {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(name, "text that is not base64", "a base64-encoded PNG, JPEG or WebP image") from None
    return decode(data, name, **limits)


def read_file(path, name: str = "image", **limits) -> Image.Image:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidParameter(name, str(path), f"a readable image file ({e.strerror or type(e).__name__})") from None
    return decode(data, name, **limits)


def encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
