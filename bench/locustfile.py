"""The load generator's user (locust): POST /score with random waits of a fixed mean, every answer recorded.

Run by fastsd.bench.loadtest (`locust -f bench/locustfile.py --headless ...`), never imported by fastsd:
locust patches the standard library (gevent) in the process that imports it. Settings come from the
environment (FASTSD_LOAD_*): the mean wait per user (seconds between one answer and the next request),
the steps of each request, the client deadline (X-Request-Timeout), a bearer token, and the JSON file
every answer is written to when the run ends (status, seconds, Retry-After, error). A user idle longer than
FASTSD_LOAD_REOPEN_AFTER seconds opens a new connection first, as a well-behaved HTTP/1.1 client does: the
gateway closes idle connections after its keep-alive, and a request sent as it closes one is reset (seen: 1
of 203 lost in a CI run, the gap between two of a user's requests being exponential and often over 5 s).
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
REOPEN_AFTER = float(os.environ.get("FASTSD_LOAD_REOPEN_AFTER", "inf"))
RECORDS = []


class ScoreUser(HttpUser):
    last_answer = None  # monotonic time of this user's last answer

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
        if self.last_answer is not None and t - self.last_answer > REOPEN_AFTER:
            self.client.close()  # requests.Session: drops its pooled connections; the next request opens one
        with self.client.post("/score", json=body, headers=headers, catch_response=True, name="/score") as r:
            record = {"start": t, "seconds": time.monotonic() - t, "status": r.status_code,
                      "retry_after": r.headers.get("Retry-After"), "error": str(r.error)[:200] if r.error else None}
            RECORDS.append(record)
            self.last_answer = time.monotonic()
            if r.status_code == 200 or (r.status_code in (429, 503) and record["retry_after"]):
                r.success()  # a shed request is an answer too; the driver counts them apart
            else:
                r.failure(f"status {r.status_code}")


@events.quitting.add_listener
def _write(environment, **kw):
    with open(OUT, "w") as f:
        json.dump(RECORDS, f)
