"""Structured JSON access log: one line per request, optional and sampled."""

from __future__ import annotations

import json
import random
import sys
import time
from typing import IO

from aiohttp import web
from aiohttp.web_request import BaseRequest

from proxy.config import AccessLog as AccessLogConfig


class AccessLog:
    def __init__(self, config: AccessLogConfig, rng: random.Random | None = None) -> None:
        self._sample_rate = config.sample_rate
        self._rng = rng or random.Random()
        self._out: IO[str] = sys.stdout if config.path == "-" else open(  # noqa: SIM115
            config.path, "a", buffering=1, encoding="utf-8")

    def record(self, request: BaseRequest, resp: web.StreamResponse | None, cluster: str,
               duration_s: float) -> None:
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
            "cluster": cluster,
            "backend": headers.get("x-foretell-backend"),
            "error": headers.get("x-foretell-error"),
            "request_id": headers.get("X-Request-Id"),
            "bytes_out": resp.body_length if resp is not None and resp.prepared else None,
        }
        self._out.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()
