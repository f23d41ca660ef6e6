"""Locust users for bench_service.py: POST /retrieve with the out_dir's test histories, no think time.

Environment: SA2CRQ_BENCH_QUERIES (a JSON list of request bodies), SA2CRQ_BENCH_MAX_REQUESTS
(the run stops after this many requests, whatever -t says).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from locust import FastHttpUser, task

BODIES = json.loads(Path(os.environ["SA2CRQ_BENCH_QUERIES"]).read_text())
MAX_REQUESTS = int(os.environ.get("SA2CRQ_BENCH_MAX_REQUESTS", "20000"))
sent = 0


class Retriever(FastHttpUser):
    @task
    def retrieve(self) -> None:
        global sent
        sent += 1
        if sent > MAX_REQUESTS:
            self.environment.runner.quit()
            return
        with self.client.post("/retrieve", json=random.choice(BODIES), catch_response=True) as res:
            if res.status_code != 200:
                res.failure(f"{res.status_code}: {res.text[:200]}")
