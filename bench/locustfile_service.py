"""Locust users for bench_service.py: POST /retrieve with the out_dir's test histories, no think time.

Environment: SA2CRQ_BENCH_QUERIES (a JSON list of request bodies), SA2CRQ_BENCH_MAX_REQUESTS
(the run stops after this many requests, whatever -t says), SA2CRQ_BENCH_TALLY (a JSON file
written at exit: answers per served version and failed requests, counted from the first request;
locust's own CSV drops the spawn phase with --reset-stats, and a promotion must lose none).
"""
from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from locust import FastHttpUser, events, task

BODIES = json.loads(Path(os.environ["SA2CRQ_BENCH_QUERIES"]).read_text())
MAX_REQUESTS = int(os.environ.get("SA2CRQ_BENCH_MAX_REQUESTS", "20000"))
TALLY = os.environ.get("SA2CRQ_BENCH_TALLY")
sent = 0
failed = 0
versions: Counter[str] = Counter()


class Retriever(FastHttpUser):
    @task
    def retrieve(self) -> None:
        global sent, failed
        sent += 1
        if sent > MAX_REQUESTS:
            self.environment.runner.quit()
            return
        with self.client.post("/retrieve", json=random.choice(BODIES), catch_response=True) as res:
            if res.status_code != 200:
                failed += 1
                res.failure(f"{res.status_code}: {(res.text or '')[:200]}")
            else:
                versions[res.json()["version"]] += 1


@events.quitting.add_listener
def write_tally(**_: object) -> None:
    if TALLY:
        Path(TALLY).write_text(json.dumps({"versions": dict(versions), "failed": failed}))
