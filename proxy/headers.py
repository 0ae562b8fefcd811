"""Header rewriting between client and upstream (RFC 9110 §7.6.1, §7.6.3).

Hop-by-hop headers belong to one connection and are never forwarded; the
proxy adds X-Forwarded-*, Via and a request id.
"""

from __future__ import annotations

import random

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
VIA = "1.1 foretell"
REQUEST_ID = "X-Request-Id"
_EXPECT = frozenset({"expect"})
_ids = random.Random()


def _skip_set(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    connection = headers.get("Connection")
    if connection is None:
        return HOP_BY_HOP | drop
    named = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    return HOP_BY_HOP | drop | named


def strip_hop_by_hop(headers: CIMultiDictProxy[str], drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones, what Connection names, and `drop` (lower case)."""
    skip = _skip_set(headers, drop)
    return CIMultiDict([
        (name, value) for name, value in headers.items()
        if (lower := name.lower()) not in skip and not lower.startswith("proxy-")
    ])


def upstream_request_headers(headers: CIMultiDictProxy[str], *, client_ip: str, scheme: str,
                             host: str) -> tuple[CIMultiDict[str], str]:
    """Headers to send upstream, and the request id (kept from the client or new)."""
    # Expect is answered by the proxy itself, so the upstream never sees it.
    out = strip_hop_by_hop(headers, drop=_EXPECT)
    prior = out.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out.setdefault("X-Forwarded-Proto", scheme)
    if host:
        out.setdefault("X-Forwarded-Host", host)
    via = out.get("Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    request_id = out.get(REQUEST_ID)
    if not request_id:
        # Unique, not secret: a fast PRNG is enough and avoids a syscall per request.
        request_id = f"{_ids.getrandbits(128):032x}"
        out[REQUEST_ID] = request_id
    return out, request_id


def client_response_headers(headers: CIMultiDictProxy[str], *, backend_id: str,
                            request_id: str) -> CIMultiDict[str]:
    out = strip_hop_by_hop(headers)
    via = out.get("Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    out["x-foretell-backend"] = backend_id
    out.setdefault(REQUEST_ID, request_id)
    return out
