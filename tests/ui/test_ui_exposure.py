"""Who may use the page: loopback only unless a token is set, the token as Gradio's password, and a
deployment with no replica up is a readable error on the page. Against a deployment record (MII's score
file and fastsd's spec) with no server behind it, so no model is loaded."""
import pytest

pytest.importorskip("gradio")  # the ui extra
pytest.importorskip("mii")  # the serving extra
from fastsd.errors import InvalidParameter  # noqa: E402
from fastsd.ui.app import check_exposure, launch  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def fake_deployment(tmp_path, monkeypatch, token_required: bool) -> str:
    from mii.legacy.models.score import create_score_file

    from fastsd.serving.ports import free_port_block
    from fastsd.serving.records import plan_replicas
    from fastsd.serving.request import Limits
    from fastsd.serving.spec import DeploymentSpec
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    name = "nobody-home"
    ddir = tmp_path / name
    ddir.mkdir()
    port = free_port_block(2)
    plan, cfg = plan_replicas(name, ddir, 1, port, "127.0.0.1", None, None, "fastsd-shapes")
    create_score_file(cfg)  # what mii_query_handle(name) reads; nothing listens on its ports
    DeploymentSpec(name=name, model="fastsd-shapes", replicas=plan, max_batch=2, limits=Limits(timeout=20),
                   token_required=token_required, host="127.0.0.1", port=port).write(ddir)
    return name


def test_no_token_means_loopback_only(tmp_path, monkeypatch):
    name = fake_deployment(tmp_path, monkeypatch, token_required=False)
    check_exposure("127.0.0.1", None, name)
    with pytest.raises(InvalidParameter, match="^host: got '0.0.0.0'.*token"):
        check_exposure("0.0.0.0", None, name)
    check_exposure("0.0.0.0", "secret", name)


def test_a_deployment_with_a_token_gets_a_page_with_one(tmp_path, monkeypatch):
    name = fake_deployment(tmp_path, monkeypatch, token_required=True)
    with pytest.raises(InvalidParameter, match="^token: .*requires one"):
        check_exposure("127.0.0.1", None, name)


def test_token_is_the_password_and_no_replica_is_a_readable_error(tmp_path, monkeypatch):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from fastsd.serving.ports import free_port_block
    name = fake_deployment(tmp_path, monkeypatch, token_required=True)
    port = free_port_block(1)
    demo, _ = launch(name, "127.0.0.1", port, token="secret", block=False)
    try:
        url = f"http://127.0.0.1:{port}/"
        with pytest.raises(Exception):  # noqa: B017 - gradio_client's error for a refused login varies
            Client(url, verbose=False).predict(prompt="a red circle", api_name="/generate")
        with pytest.raises(Exception):  # noqa: B017
            Client(url, auth=("anyone", "wrong"), verbose=False)
        client = Client(url, auth=("anyone", "secret"), verbose=False)
        with pytest.raises(AppError) as e:
            client.predict(prompt="a red circle", steps=2, api_name="/generate")
        assert "The deployment is not reachable" in str(e.value) and "Traceback" not in str(e.value)
    finally:
        demo.close()


def test_ui_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from fastsd.cli import main
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    assert main(["ui", "--deployment", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no running deployment named 'nope'" in err[0], err


def test_serve_refuses_a_public_page_without_a_token(tmp_path, monkeypatch, capsys):
    from fastsd.cli import main
    monkeypatch.setenv("MII_CACHE_PATH", str(tmp_path))
    monkeypatch.delenv("FASTSD_TOKEN", raising=False)
    assert main(["serve", "--deployment", "pub", "--model", "tiny", "--ui-port", "7999", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --ui-port:" in err[0] and "with --host 0.0.0.0, a token" in err[0], err
