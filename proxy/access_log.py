"""Structured JSON access log: one line per request, optional and sampled.

Written from aiohttp's access-log hook (`ProxyRequestHandler.log_access`),
once the response is sent: the duration includes the final write, bytes_out
is what went out, and requests refused before the handler (400, 431) are
logged too.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import IO

from aiohttp import web
from aiohttp.web_request import BaseRequest

from proxy.config import AccessLog as AccessLogConfig

# Where the request path leaves the cluster name on the request for the log.
CLUSTER_KEY = web.RequestKey("foretell_cluster", str)


class AccessLog:
    def __init__(self, config: AccessLogConfig, rng: random.Random | None = None) -> None:
        self._sample_rate = config.sample_rate
        self._rng = rng or random.Random()
        self._out: IO[str] = sys.stdout if config.path == "-" else open(  # noqa: SIM115
            config.path, "a", buffering=1, encoding="utf-8")

    def record(self, request: BaseRequest, resp: web.StreamResponse | None, duration_s: float) -> None:
        if self._sample_rate < 1.0 and self._rng.random() >= self._sample_rate:
            return
        headers = resp.headers if resp is not None else {}
        entry = {
            "ts": round(time.time(), 6),
            "client": request.remote,
            "method": request.method,
            "path": request.path,
            "status": resp.status if resp is not None else 0,
            "duration_ms": round(duration_s * 1e3, 3),
            "cluster": request.get(CLUSTER_KEY, "-"),
            "backend": headers.get("x-foretell-backend"),
            "error": headers.get("x-foretell-error"),
            "request_id": headers.get("X-Request-Id"),
            "bytes_out": resp.body_length if resp is not None and resp.prepared else None,
        }
        self._out.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()
