"""REST image URLs under `fastsd serve --image-url-allow PREFIX`: which URLs pass the schema, and the fetch
against a real http.server on 127.0.0.1 (allowed prefix fetched; redirects, oversized bodies, errors and
slow servers refused with a 422-style InvalidParameter naming the field). The whole path through a real
deployment: tests/serving/test_serving_tasks.py (slow)."""
import base64
import http.server
import io
import json
import threading
import time

import pytest
from PIL import Image

from fastsd.errors import InvalidParameter
from fastsd.serving import image_urls
from fastsd.serving.image_urls import ImageUrl, check_prefix, fetch, fetch_cells
from fastsd.serving.request import Limits
from fastsd.serving.rest import BadRequest, read_score_body

LIMIT = 4096


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok/a.png":
            body = png()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/ok/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/ok/a.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/ok/big-undeclared.png":  # no Content-Length: only the streaming count can stop it
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(8):
                self.wfile.write(b"\0" * LIMIT)
        elif self.path == "/ok/big-declared.png":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * LIMIT))
            self.end_headers()
            self.wfile.write(b"\0" * 10 * LIMIT)
        elif self.path == "/ok/slow.png":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(50):  # 5 s in all
                self.wfile.write(b"\0" * 16)
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


class QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that stopped reading (the refusals) is expected: no traceback on stderr


@pytest.fixture(scope="module")
def server():
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def body(*cells, columns=("prompt", "image")) -> bytes:
    return json.dumps({"input_data": {"columns": list(columns), "data": [["a", *cells]]}}).encode()


def test_schema_passes_only_allowed_urls(server):
    port = int(server.rsplit(":", 1)[1])
    limits = Limits(image_url_allow=(server + "/ok/",))
    q = read_score_body(body(server + "/ok/a.png"), limits, with_images=True)
    assert {"image": q.image, "mask_image": q.mask_image} == {"image": [ImageUrl(server + "/ok/a.png")],
                                                               "mask_image": []}
    b64 = base64.b64encode(png()).decode()
    q = read_score_body(body(b64, server.upper() + "/ok/m.png", columns=("prompt", "image", "mask_image")),
                        limits, with_images=True)  # scheme and host compared after parsing
    assert q.image == [png()] and q.mask_image == [ImageUrl(server.upper() + "/ok/m.png")]
    for url in [f"http://127.0.0.1:{port + 1}/ok/a.png",  # another port
                f"http://localhost:{port}/ok/a.png",  # another host name for the same address
                f"https://127.0.0.1:{port}/ok/a.png",  # another scheme
                server + "/other/a.png", server + "/ok/../secret.png", server + "/ok/%2e%2e/secret.png",
                f"http://user:pw@127.0.0.1:{port}/ok/a.png", "file:///etc/passwd", "ftp://127.0.0.1/ok/a.png"]:
        with pytest.raises(BadRequest) as e:
            read_score_body(body(url), limits, with_images=True)
        assert e.value.status == 422 and e.value.param == "image" and e.value.extra == {}, url
        assert "allowed prefixes" in e.value.message or "does not fetch" in e.value.message
    with pytest.raises(BadRequest) as e:  # no allow-list: every URL refused, as before
        read_score_body(body(server + "/ok/a.png"), Limits(), with_images=True)
    assert "does not fetch URLs" in e.value.message


def test_fetch_allowed_url(server):
    assert fetch(server + "/ok/a.png", "image", LIMIT) == png()
    cells = {"image": [ImageUrl(server + "/ok/a.png")], "mask_image": [b"inline"]}
    assert fetch_cells(cells, LIMIT) == {"image": [png()], "mask_image": [b"inline"]}


@pytest.mark.parametrize("path, why", [
    ("/ok/redirect.png", "redirect (HTTP 302); redirects are not followed"),
    ("/ok/big-undeclared.png", f"its body is larger than {LIMIT} bytes"),
    ("/ok/big-declared.png", f"it declares {10 * LIMIT} bytes; at most {LIMIT}"),
    ("/ok/missing.png", "HTTP 404"),
])
def test_fetch_refusals_name_the_field(server, path, why):
    with pytest.raises(InvalidParameter) as e:
        fetch(server + path, "mask_image", LIMIT)
    assert e.value.name == "mask_image" and why in str(e.value) and "\n" not in str(e.value)


def test_fetch_timeout_and_unreachable(server):
    t0 = time.monotonic()
    with pytest.raises(InvalidParameter, match="not fetched within 0.5 s|timed out"):
        fetch(server + "/ok/slow.png", "image", LIMIT, timeout=0.5)
    assert time.monotonic() - t0 < 4  # the deadline, not the end of the 5 s body (load on the machine aside)
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()[1]
    s.close()
    with pytest.raises(InvalidParameter, match="ConnectionRefusedError"):
        fetch(f"http://127.0.0.1:{closed}/ok/a.png", "image", LIMIT)


def test_request_byte_budget_spans_cells(server):
    size = len(png())
    cells = {"image": [ImageUrl(server + "/ok/a.png")], "mask_image": [b"x" * (LIMIT - size + 1)]}
    with pytest.raises(InvalidParameter, match=f"declares {size} bytes; at most {LIMIT - (LIMIT - size + 1)}"):
        fetch_cells(cells, LIMIT)
    cells = {"image": [b"x" * LIMIT], "mask_image": [ImageUrl(server + "/ok/a.png")]}
    with pytest.raises(InvalidParameter, match=f"at most {LIMIT} bytes of images"):
        fetch_cells(cells, LIMIT)


def test_prefix_checked(monkeypatch):
    assert check_prefix(" https://images.example.com/ ") == "https://images.example.com/"
    for bad in ["ftp://images.example.com/", "images.example.com/", "http:///x", "https://a.example.com/?q=1",
                "http://u:p@a.example.com/", "http://a.example.com:99999/"]:
        with pytest.raises(InvalidParameter) as e:
            check_prefix(bad)
        assert e.value.name == "--image-url-allow", bad
    assert image_urls.allowed("https://images.example.com:443/x.png", ["https://images.example.com/"])
    assert not image_urls.allowed("https://images.example.com.evil.net/x.png", ["https://images.example.com/"])


def test_serve_refuses_bad_prefix_without_starting(tmp_path, monkeypatch, capsys):
    from fastsd.cli import main
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    assert main(["serve", "--model", "tiny", "--deployment", "x", "--rest-port", "9", "--image-url-allow",
                 "ftp://a.example.com/"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastsd serve: error: --image-url-allow: got 'ftp://a.example.com/'")
    assert main(["serve", "--model", "tiny", "--deployment", "x", "--image-url-allow", "http://127.0.0.1:1/"]) == 2
    assert "only with --rest-port" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
