"""fastsd's Ray Serve application on a real two-node cluster (the short cluster test; the
long one is test_ray_cluster.py, `make test-slow`): two engine replicas of fastsd-shapes land on both nodes,
/score answers with `fastsd generate`'s image pixel for pixel and refuses a bad value in the REST gateway's
own error shape, and shutting down leaves no process behind."""
import pytest

from conftest import PROMPT, SEED, STEPS, RayApp, image_of, post, same, score_body

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
# in `make test`: about a minute on 2 quiet cores (the ingress imports no torch; the engines' imports dominate)
pytestmark = [pytest.mark.timeout(600)]


def test_two_nodes_same_image_and_clean_shutdown(short_tmp, tmp_path):
    from fastsd.cli import main
    out = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--model", "fastsd-shapes", "--quiet", "--steps", str(STEPS), "--seed",
                 str(SEED), "--scheduler", "euler", "--out", str(out)]) == 0
    from PIL import Image
    want = Image.open(out)

    app = RayApp(short_tmp, {"model": "fastsd-shapes", "num_replicas": 2, "threads": 1})
    try:
        nodes = app.replicas()
        assert set(nodes) == {app.cluster.head_node.node_id, app.worker.node_id}  # one replica on each node

        status, headers, doc = post(app.url + "/score", score_body(), {"X-Request-ID": "ray-short-1"})
        assert status == 200 and headers.get("x-request-id") == "ray-short-1"
        assert same(image_of(doc), want)

        status, headers, doc = post(app.url + "/score", score_body(num_inference_steps=0))
        assert status == 422 and doc["parameter"] == "num_inference_steps" and doc["request_id"]
    finally:
        left = app.shutdown()
    assert left == set(), f"processes left after shutdown: {sorted(left)}"
