"""`fastsd serve --ray` as a user runs it: a one-machine Ray cluster in the command's process, the routes on
--rest-port, a request answered, and Ctrl-C (SIGINT) stopping the application and the cluster with exit 0 and
no process left; options the Ray runtime does not take are one line, exit 2, before Ray starts."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import RAY_ENV, descendants, post, score_body

pytest.importorskip("ray.serve")


@pytest.mark.parametrize("argv, says", [
    (["--ray", "--hostfile", "h"], "--hostfile: got 'h'; allowed: nothing with --ray"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address: got '127.0.0.1:1'; allowed: only with --ray"),
    (["--ray", "--replicas", "0"], "--replicas: got 0; allowed: an integer, 1..1024"),
    (["--ray", "--num-gpus", "-1"], "expected a number of 0 or more")])
def test_a_bad_option_is_one_line_and_exit_2(argv, says, capsys):
    from fastsd.cli import main
    try:
        code = main(["serve", "--model", "fastsd-shapes", "-d", "r", *argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and says in err and len([x for x in err.splitlines() if "error" in x]) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_ray_runs_until_ctrl_c(short_tmp):
    from fastsd.serving import ports
    port = ports.free_port_block(1)
    before = descendants()
    env = dict(os.environ, **RAY_ENV, RAY_TMPDIR=short_tmp, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "fastsd.cli", "serve", "--ray", "--model", "fastsd-shapes",
                             "--deployment", "shapes", "--replicas", "1", "--threads", "1", "--rest-port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 600
        while time.monotonic() < end and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(1)
        status, headers, doc = post(f"http://127.0.0.1:{port}/score", score_body())
        assert status == 200 and len(doc) == 1 and doc[0]["generated_image"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "is up" in out and "stopping" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    end = time.monotonic() + 30
    while (left := descendants() - before) and time.monotonic() < end:
        time.sleep(0.5)
    assert left == set()
