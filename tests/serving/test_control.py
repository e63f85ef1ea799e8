"""Who may control and query a deployment (issue 24, item 7), in one process: the stop key file, the token on
gRPC off loopback, and the load balancer's listeners with TLS (a self-signed certificate made with openssl):
over TLS on --host and plain on loopback, MII's Terminate refused without the key on both."""
import shutil
import stat
import subprocess
import threading

import grpc
import pytest
from google.protobuf import empty_pb2

from fastsd.errors import InvalidParameter
from fastsd.serving import control, ports, proto
from fastsd.serving.request import Limits
from fastsd.serving.spec import DeploymentSpec


def test_stop_key_file_is_private_and_new_each_time(tmp_path):
    a = control.create_stop_key(tmp_path)
    assert stat.S_IMODE((tmp_path / control.STOP_KEY_FILE).stat().st_mode) == 0o600
    assert control.read_stop_key(tmp_path) == a and len(a) >= 32
    assert control.create_stop_key(tmp_path) != a
    assert not control.may_control({}, a) and not control.may_control({"fastsd-stop-key": "x"}, a)
    assert control.may_control({"fastsd-stop-key": control.read_stop_key(tmp_path)}, control.read_stop_key(tmp_path))
    assert not control.may_control({"fastsd-stop-key": ""}, None)  # no key file: nothing is obeyed


def test_token_needed_off_loopback_only():
    auth = {"authorization": "Bearer t0k"}
    assert control.may_query({}, "ipv4:10.0.0.5:4000", None)  # no token set: open, as MII
    assert control.may_query({}, "ipv4:127.0.0.1:4000", "t0k") and control.may_query({}, "ipv6:[::1]:4000", "t0k")
    assert not control.may_query({}, "ipv4:10.0.0.5:4000", "t0k")
    assert not control.may_query({"authorization": "Bearer nope"}, "ipv4:10.0.0.5:4000", "t0k")
    assert control.may_query(auth, "ipv4:10.0.0.5:4000", "t0k")


def test_tls_options_checked(tmp_path):
    with pytest.raises(InvalidParameter, match="--tls-key"):
        control.check_tls(str(tmp_path / "c.pem"), None)
    with pytest.raises(InvalidParameter, match="--tls-cert"):
        control.check_tls(str(tmp_path / "missing.pem"), str(tmp_path / "missing.pem"))
    control.check_tls(None, None)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
def test_balancer_listens_with_tls_on_host_and_plain_on_loopback(tmp_path):
    from concurrent import futures

    from fastsd.serving.balancer import HealthAwareBalancer, listen, make_handlers
    host = "127.0.0.2"  # an address other than loopback's 127.0.0.1, on this machine
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    port = ports.free_port_block(1)
    spec = DeploymentSpec(name="tls", model="tiny", host=host, port=port, replicas=[], limits=Limits(timeout=5),
                          max_batch=1, tls_cert=str(cert), tls_key=str(key))
    balancer = HealthAwareBalancer(spec, tmp_path, token="t0k", stop_key=control.create_stop_key(tmp_path))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         handlers=[make_handlers(balancer, threading.Event())])
    listen(server, spec)
    server.start()
    try:
        secure = grpc.secure_channel(f"{host}:{port}", grpc.ssl_channel_credentials(cert.read_bytes()))
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        for channel in (secure, plain):
            with pytest.raises(grpc.RpcError) as e:
                proto.stub(channel, "Terminate")(empty_pb2.Empty(), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # TLS handshake done; no key, no stop
        with pytest.raises(grpc.RpcError) as e:  # plain gRPC on the TLS listener gets no answer
            proto.stub(grpc.insecure_channel(f"{host}:{port}"), "Terminate")(empty_pb2.Empty(), timeout=3)
        assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        request = proto.messages().Text2ImageRequest(prompt=["a"])
        with pytest.raises(grpc.RpcError) as e:  # no replica: a fast no with Retry-After
            proto.stub(plain, "Txt2ImgReply")(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert int(dict(e.value.trailing_metadata())["fastsd-retry-after"]) >= 1
        assert not (tmp_path / "stopping").exists()
        proto.stub(plain, "Terminate")(empty_pb2.Empty(), timeout=10,
                                       metadata=[("fastsd-stop-key", control.read_stop_key(tmp_path))])
        assert (tmp_path / "stopping").exists()  # with the key it is obeyed
        secure.close()
        plain.close()
    finally:
        balancer._stop.set()
        server.stop(0)
