"""Header rewriting between client and upstream (RFC 9110 §7.6.1, §7.6.3).

Hop-by-hop headers belong to one connection and are never forwarded; the
proxy adds X-Forwarded-*, Via and a request id.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
VIA = "1.1 foretell"
REQUEST_ID = "X-Request-Id"


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def strip_hop_by_hop(headers: CIMultiDictProxy[str], drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop ones, what Connection names, and `drop`."""
    skip = HOP_BY_HOP | _connection_tokens(headers) | frozenset(d.lower() for d in drop)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in skip or lower.startswith("proxy-"):
            continue
        out.add(name, value)
    return out


def upstream_request_headers(headers: CIMultiDictProxy[str], *, client_ip: str, scheme: str,
                             host: str) -> tuple[CIMultiDict[str], str]:
    """Headers to send upstream, and the request id (kept from the client or new)."""
    # Expect is answered by the proxy itself, so the upstream never sees it.
    out = strip_hop_by_hop(headers, drop=("expect",))
    prior = out.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out.setdefault("X-Forwarded-Proto", scheme)
    if host:
        out.setdefault("X-Forwarded-Host", host)
    via = out.get("Via")
    out["Via"] = f"{via}, {VIA}" if via else VIA
    request_id = out.get(REQUEST_ID)
    if not request_id:
        request_id = uuid.uuid4().hex
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
