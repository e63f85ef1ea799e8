"""The load generator's user (locust): POST /score with random waits of a fixed mean, every answer recorded.

Run by fastsd.bench.loadtest (`locust -f bench/locustfile.py --headless ...`), never imported by fastsd:
locust patches the standard library (gevent) in the process that imports it. Settings come from the
environment (FASTSD_LOAD_*): the mean wait per user (seconds between one answer and the next request),
the steps of each request, the client deadline (X-Request-Timeout), a bearer token, and the JSON file
every answer is written to when the run ends (status, seconds, Retry-After, error).
"""
import json
import os
import random
import time

from locust import HttpUser, events, task

PACING = float(os.environ.get("FASTSD_LOAD_PACING", "1"))
STEPS = int(os.environ.get("FASTSD_LOAD_STEPS", "4"))
OUT = os.environ.get("FASTSD_LOAD_OUT", "load.json")
TOKEN = os.environ.get("FASTSD_LOAD_TOKEN")
DEADLINE = os.environ.get("FASTSD_LOAD_DEADLINE")
RECORDS = []


class ScoreUser(HttpUser):
    def wait_time(self):
        """Random waits of mean PACING (Poisson arrivals): locust spawns users in bursts, and a fixed pace
        would keep each burst together for the whole run."""
        return random.expovariate(1.0 / PACING)

    @task
    def score(self):
        body = {"input_data": {"data": [f"a red circle {len(RECORDS)}"], "parameters": {"num_inference_steps": STEPS}}}
        headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
        if DEADLINE:
            headers["X-Request-Timeout"] = DEADLINE
        t = time.monotonic()
        with self.client.post("/score", json=body, headers=headers, catch_response=True, name="/score") as r:
            record = {"start": t, "seconds": time.monotonic() - t, "status": r.status_code,
                      "retry_after": r.headers.get("Retry-After"), "error": str(r.error)[:200] if r.error else None}
            RECORDS.append(record)
            if r.status_code == 200 or (r.status_code in (429, 503) and record["retry_after"]):
                r.success()  # a shed request is an answer too; the driver counts them apart
            else:
                r.failure(f"status {r.status_code}")


@events.quitting.add_listener
def _write(environment, **kw):
    with open(OUT, "w") as f:
        json.dump(RECORDS, f)
