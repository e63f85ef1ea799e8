"""Slow clients against the REST gateway's HTTP server (issue 24, items 3 and 5), with the real uvicorn
and the gateway's protocol in this process: connections that trickle partial headers are closed after
the header timeout, at most the connection limit is open at once (the oldest slow one makes room),
/health answers throughout, refusals are logged at most once a second, a body that trickles gets 408,
and a client that disconnects cancels its deployment call (logged 499)."""
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")  # the serving extra
import uvicorn  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from fastsd.serving import gateway as gateway_module  # noqa: E402
from fastsd.serving import ports, slowloris  # noqa: E402
from fastsd.serving.errors import DeploymentError  # noqa: E402
from fastsd.serving.gateway import Gateway  # noqa: E402
from fastsd.serving.request import Limits  # noqa: E402
from fastsd.serving.rest import create_app  # noqa: E402
from fastsd.serving.spec import DeploymentSpec, ReplicaPlacement  # noqa: E402

BODY = b'{"input_data": {"data": ["a"]}}'


class WaitsForCancel:
    def __init__(self):
        self.cancelled = threading.Event()

    def generate(self, prompts, negatives=None, *, timeout=None, cancel=None, **kw):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cancel.is_set():
                self.cancelled.set()
                raise DeploymentError("CANCELLED", "the caller cancelled the request")
            time.sleep(0.02)
        raise DeploymentError("DEADLINE_EXCEEDED", "late")


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(slowloris, "HEADER_TIMEOUT", 1.0)
    monkeypatch.setattr(slowloris.GuardedH11Protocol, "limit", 8)
    monkeypatch.setattr(gateway_module, "BODY_TIMEOUT", 1.0)
    spec = DeploymentSpec(name="slow", model="tiny", replicas=[ReplicaPlacement(0, "127.0.0.1", 1, "127.0.0.1")],
                          limits=Limits(timeout=20), max_batch=1)
    client = WaitsForCancel()
    port = ports.free_port_block(1)
    app = create_app(spec, None, Gateway(spec, client, ThreadPoolExecutor(8), None))
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", "") != "/health"]

    @app.get("/health")  # the gateway's own probe asks the load balancer; here the process alone answers
    def health():
        return {"status": "ok"}
    slowloris.install_log_limits()
    monkeypatch.setattr(slowloris, "KEEP_ALIVE_S", 0.5)
    srv = uvicorn.Server(slowloris.server_config(app, "127.0.0.1", port))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert _wait(lambda: ports.port_answers(port))
    yield {"port": port, "client": client}
    srv.should_exit = True
    thread.join(10)


def get(port, path="/health", timeout=3.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return s.recv(4096).split(b"\r\n", 1)[0]


def read_response(sock) -> bytes:
    """One whole response (headers and a Content-Length body), so that nothing of it is left on the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(v for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                      if k.strip().lower() == b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return data


def closed(sock) -> bool:
    try:
        sock.settimeout(0.05)
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_trickling_headers_are_closed_and_health_answers(server, caplog):
    port = server["port"]
    caplog.set_level(logging.WARNING, logger="fastsd.serving.slowloris")
    slow = []
    for _ in range(30):  # far more than the limit of 8
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        slow.append(s)
    t_end = time.monotonic() + 2.5
    answers = []
    while time.monotonic() < t_end:  # health answers throughout, though slow clients hold every slot
        answers.append(get(port))
        for s in slow:
            try:
                s.send(b"X-a: b\r\n")  # trickle
            except OSError:
                pass
        time.sleep(0.2)
    assert answers and all(a == b"HTTP/1.1 200 OK" for a in answers), answers
    assert all(closed(s) for s in slow)  # the oldest were made room for, the rest timed out
    refusals = [r for r in caplog.records if r.name == "fastsd.serving.slowloris"]
    assert 0 < len(refusals) <= 2 * 3 + 2, [r.getMessage() for r in refusals]  # at most ~1 a second per kind
    for s in slow:
        s.close()


def test_idle_kept_alive_connection_closes_after_keep_alive(server, monkeypatch):
    """The keep-alive the gateway names (KEEP_ALIVE_S, 0.5 s here) is the one its server applies: a connection
    idle for less is reused, one idle for longer is closed by the server (clients reopen; locustfile.py)."""
    monkeypatch.setattr(slowloris, "HEADER_TIMEOUT", 5.0)  # so that the header timer cannot be what closes it
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=3) as s:
        for _ in range(2):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200")
            time.sleep(0.2)
            assert not closed(s)
        assert _wait(lambda: closed(s), timeout=3)


def test_trickling_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=5) as s:
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        t = time.monotonic()
        head = s.recv(4096)
        while b"did not arrive" not in head and time.monotonic() - t < 5:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 408") and b"did not arrive" in head
        assert time.monotonic() - t < 3


def test_disconnect_cancels_the_call_and_is_logged_499(server, caplog):
    caplog.set_level(logging.INFO, logger="fastsd.access")
    s = socket.create_connection(("127.0.0.1", server["port"]))
    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nX-Request-ID: gone-1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
    time.sleep(0.5)
    s.close()
    assert server["client"].cancelled.wait(5)  # the deployment call was cancelled
    assert _wait(lambda: any(getattr(r, "access", {}).get("request_id") == "gone-1" for r in caplog.records))
    line = next(r.access for r in caplog.records if getattr(r, "access", {}).get("request_id") == "gone-1")
    assert line["status"] == 499


def test_rate_limited_filter():
    f = slowloris.RateLimited(interval=1.0)
    rec = [logging.LogRecord("x", logging.WARNING, "", 0, "refused %s", ("a",), None) for _ in range(100)]
    assert sum(f.filter(r) for r in rec) == 1


def _wait(check, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.05)
    return check()
