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
# Rewritten by the proxy (Expect is answered by the proxy itself).
_UPSTREAM_REWRITTEN = frozenset({"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                                 "via", "x-request-id"})
_VIA = frozenset({"via"})
# ... and the Host too, when the proxy sets it (an absolute-form target's authority).
_UPSTREAM_REWRITTEN_AND_HOST = _UPSTREAM_REWRITTEN | {"host"}
_ids = random.Random()


def _skip_set(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    connection = headers.get("Connection")
    if connection is None:
        return HOP_BY_HOP | drop
    named = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
    return HOP_BY_HOP | drop | named


def _kept(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> list[tuple[str, str]]:
    skip = _skip_set(headers, drop)
    return [(name, value) for name, value in headers.items()
            if (lower := name.lower()) not in skip and not lower.startswith("proxy-")]


def _joined(headers: CIMultiDictProxy[str], name: str) -> str | None:
    values = headers.getall(name, None)
    return ", ".join(values) if values else None


def upstream_request_headers(headers: CIMultiDictProxy[str], *, client_ip: str, scheme: str,
                             host: str, host_header: str | None = None
                             ) -> tuple[list[tuple[str, str]], str]:
    """Headers to send upstream (as pairs, which the client copies once), and the request
    id. `host_header` replaces the client's Host (an absolute-form target's authority)."""
    if host_header is None:
        out = _kept(headers, _UPSTREAM_REWRITTEN)
    else:
        out = _kept(headers, _UPSTREAM_REWRITTEN_AND_HOST)
        out.append(("Host", host_header))
    prior = _joined(headers, "X-Forwarded-For")
    out.append(("X-Forwarded-For", f"{prior}, {client_ip}" if prior else client_ip))
    # Proto and Host describe the client's connection to this proxy: set, never
    # taken from the client, which could claim https over plain http.
    out.append(("X-Forwarded-Proto", scheme))
    if host:
        out.append(("X-Forwarded-Host", host))
    via = _joined(headers, "Via")
    out.append(("Via", f"{via}, {VIA}" if via else VIA))
    request_id = headers.get(REQUEST_ID)
    if not request_id:
        # Unique, not secret: a fast PRNG is enough and avoids a syscall per request.
        request_id = f"{_ids.getrandbits(128):032x}"
    out.append((REQUEST_ID, request_id))
    return out, request_id


def client_response_headers(headers: CIMultiDictProxy[str], *, backend_id: str,
                            request_id: str) -> CIMultiDict[str]:
    out = _kept(headers, _VIA)
    via = _joined(headers, "Via")
    out.append(("Via", f"{via}, {VIA}" if via else VIA))
    out.append(("x-foretell-backend", backend_id))
    if REQUEST_ID not in headers:
        out.append((REQUEST_ID, request_id))
    return CIMultiDict(out)
