"""Image URLs in REST requests, fetched only under an explicit allow-list (`fastsd serve --image-url-allow
PREFIX`): a server that fetches any URL on request can be sent to internal addresses (SSRF).

A URL is fetched when its scheme, host and port equal an allowed prefix's (after parsing; the port
defaults to 80 / 443) and its path starts with the prefix's path. It is fetched with the standard
library's urllib, directly (no proxy from the environment), no redirect followed, a timeout, and the
byte limit enforced while the body streams in (Content-Length is checked first but never trusted
alone). Every refusal and every failure is an InvalidParameter naming the field (HTTP 422)."""
from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import InvalidParameter

SCHEMES = {"http": 80, "https": 443}
DEFAULT_TIMEOUT = 10.0
CHUNK = 64 << 10


@dataclass(frozen=True)
class ImageUrl:
    """An image cell that names an allowed URL; the REST gateway fetches it (fetch_cells) before forwarding."""
    url: str


def _parts(url: str):
    """(scheme, host, port, path) of an http(s) URL, or ValueError."""
    p = urllib.parse.urlsplit(url.strip())
    scheme = p.scheme.lower()
    if scheme not in SCHEMES or not p.hostname:
        raise ValueError("an http:// or https:// URL with a host")
    if p.username is not None or p.password is not None:
        raise ValueError("a URL without user:password@")
    port = p.port or SCHEMES[scheme]  # p.port raises ValueError for a port out of range
    path = p.path or "/"
    if ".." in urllib.parse.unquote(path).split("/"):
        raise ValueError("a URL path without '..' segments")
    return scheme, p.hostname.lower(), port, path


def check_prefix(prefix: str) -> str:
    """A --image-url-allow value: an http(s) URL prefix with a host, e.g. https://images.example.com/."""
    try:
        _parts(prefix)
    except ValueError as e:
        raise InvalidParameter("--image-url-allow", prefix, f"{e}, e.g. https://images.example.com/") from None
    if urllib.parse.urlsplit(prefix.strip()).query or "#" in prefix:
        raise InvalidParameter("--image-url-allow", prefix, "a URL prefix without ?query or #fragment")
    return prefix.strip()


def allowed(url: str, prefixes) -> bool:
    try:
        got = _parts(url)
    except ValueError:
        return False
    for prefix in prefixes:
        scheme, host, port, path = _parts(prefix)
        if got[:3] == (scheme, host, port) and got[3].startswith(path):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def fetch(url: str, name: str, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The body of an allowed URL, at most max_bytes, within `timeout` seconds in all."""
    def refuse(why: str):
        return InvalidParameter(name, url if len(url) <= 120 else url[:120] + "...",
                                f"an image URL that can be fetched: {why}")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": "fastsd-image-fetch",
                                                   "Accept": "image/png, image/jpeg, image/webp"})
    try:
        with _OPENER.open(request, timeout=timeout) as r:
            declared = r.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise refuse(f"it declares {declared} bytes; at most {max_bytes}")
            body = bytearray()
            while True:
                chunk = r.read1(CHUNK)  # what has arrived (read() would wait for a whole chunk): the deadline holds
                if not chunk:
                    break
                body += chunk
                if len(body) > max_bytes:
                    raise refuse(f"its body is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise refuse(f"not fetched within {timeout:g} s")
            return bytes(body)
    except InvalidParameter:
        raise
    except urllib.error.HTTPError as e:
        if 300 <= e.code < 400:
            raise refuse(f"it answered a redirect (HTTP {e.code}); redirects are not followed") from None
        raise refuse(f"it answered HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:  # refused, unreachable, timeout, bad TLS
        reason = getattr(e, "reason", e)
        raise refuse(f"{type(reason).__name__}: {str(reason)[:100]}") from None


def fetch_cells(images: dict, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """{"image": [bytes | ImageUrl, ...], "mask_image": [...]} -> the same with every URL fetched; the
    fetched bytes and the inline ones together stay within max_bytes."""
    used = sum(len(v) for cells in images.values() for v in cells if isinstance(v, (bytes, bytearray)))
    out = {}
    for name, cells in images.items():
        out[name] = []
        for cell in cells:
            if isinstance(cell, ImageUrl):
                left = max_bytes - used
                if left <= 0:
                    raise InvalidParameter(name, cell.url, f"at most {max_bytes} bytes of images in one request")
                cell = fetch(cell.url, name, left, timeout)
                used += len(cell)
            out[name].append(cell)
    return out
