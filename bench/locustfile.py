"""Locust scenario for users who prefer Locust: the bench's route mix, loopback only.

    pip install locust
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 --headless -u 50 -r 10 -t 30s

Locust users are closed-loop (each waits for its answer), so latency under
overload is understated; `foretell bench run` is the open-loop reference.
Locust is not a Foretell dependency; this file is only read by Locust.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from locust import HttpUser, between, events, task  # type: ignore[import-not-found]

from bench.loadgen import check_loopback


@events.test_start.add_listener
def _loopback_only(environment: object, **_: object) -> None:
    host = getattr(environment, "host", None) or ""
    if urlsplit(host).hostname:
        check_loopback(host)  # raises for anything but 127.0.0.0/8, ::1, localhost


class MixUser(HttpUser):
    wait_time = between(0.0, 0.01)

    @task(6)
    def search(self) -> None:
        self.client.get("/search?q=locust", name="/search")

    @task(3)
    def render(self) -> None:
        self.client.get("/render/page", name="/render")

    @task(1)
    def api(self) -> None:
        self.client.get("/api/item", name="/api")
