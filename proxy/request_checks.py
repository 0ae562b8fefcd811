"""Requests the proxy refuses before routing (what it cannot forward faithfully), and
the one form it rewrites first (`origin_form`).

aiohttp's parser already refuses malformed framing (conflicting lengths, bad
chunking, obs-fold, control bytes). These are the well-formed requests a
proxy must still not pass on as they are:
- CONNECT: no tunnels here, and aiohttp reads CONNECT as bodiless, so a body
  sent with it would be taken for the next request (501, connection closed);
- an HTTP version other than 1.x (0.9 or 2.0 spoken in 1.1 framing): 505;
- a transfer coding other than plain chunked: Transfer-Encoding is
  hop-by-hop, so the backend would get coded bytes nobody declares (501), and
  HTTP/1.0 has no chunked framing at all (400, RFC 9112 §6.1);
- a Host that is not a host[:port] (RFC 3986 §3.2.2): it would be forwarded
  and copied into X-Forwarded-Host (400). An empty Host is valid. (aiohttp's
  parser refuses an HTTP/1.1 request without Host, RFC 9112 §3.2.)

An absolute-form target (`GET http://example.com/x`, RFC 9112 §3.2.2) names
the host itself, which then wins over the Host header: it is rewritten to
origin form (`/x`, `/` for an empty path) with that Host before routing. An
HTTP/1.0 request may name no host at all: its host is then "", not the
listen address aiohttp falls back to (which routes would match and
X-Forwarded-Host would claim the client asked for).
"""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.web_request import BaseRequest
from yarl import URL

from proxy import errors

# reg-name or IPv4 (unreserved, sub-delims, pct-encoded) or an IP literal, then a port.
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]*|\[[0-9A-Fa-f:.]+\])(?::(\d{0,5}))?")
# Hosts already found valid: a request's Host is nearly always one seen before, and a
# set lookup is cheaper than the match on every request. Cleared when full.
_VALID_HOSTS_MAX = 1024
_CACHED_HOST_MAX_LEN = 262  # name and ":port": long ones are checked every time, not kept
_valid_hosts: set[str] = set()


def refusal(request: BaseRequest) -> tuple[str, str] | None:
    """(error reason, detail) when the request must be refused, else None."""
    if request.method == "CONNECT":
        return errors.NOT_IMPLEMENTED, "CONNECT tunnels are not proxied"
    version = request.version
    if version.major != 1:
        return errors.VERSION_NOT_SUPPORTED, f"HTTP/{version.major}.{version.minor}"
    headers = request.headers
    if "Transfer-Encoding" in headers:
        if version.minor == 0:
            return errors.BAD_REQUEST, "Transfer-Encoding in an HTTP/1.0 request"
        codings = [c.strip(" \t").lower() for value in headers.getall("Transfer-Encoding")
                   for c in value.split(",")]
        if codings != ["chunked"]:
            return errors.NOT_IMPLEMENTED, f"transfer coding {', '.join(codings)!r}"
    host = headers.get("Host")
    if host is not None and host not in _valid_hosts:
        m = _HOST.fullmatch(host)
        if m is None or (m.group(1) and int(m.group(1)) > 65535):
            return errors.BAD_REQUEST, "invalid Host header"
        if len(host) <= _CACHED_HOST_MAX_LEN:  # a DNS name is at most 253 characters
            if len(_valid_hosts) >= _VALID_HOSTS_MAX:
                _valid_hosts.clear()
            _valid_hosts.add(host)
    return None


# On a request rewritten from absolute form: the target's authority, the Host to send.
AUTHORITY_KEY = web.RequestKey("foretell_authority", str)


def origin_form(request: BaseRequest) -> BaseRequest:
    """`request` itself, or a copy: for an absolute-form target, in origin form, whose
    host is the target's authority (without userinfo), also kept under AUTHORITY_KEY for
    the Host header sent upstream; for a request without Host, whose host is "". The
    target keeps its bytes (no re-encoding), and the headers are not copied (aiohttp
    would re-encode them, and fail on non-UTF-8 ones)."""
    raw = request.raw_path
    if raw[:1] == "/" or "://" not in raw:
        if "Host" not in request.headers:  # HTTP/1.0 (aiohttp refuses 1.1 without)
            return request.clone(host="")
        return request
    url = URL(raw, encoded=True)
    target = (url.raw_path or "/") + (f"?{url.raw_query_string}" if url.raw_query_string else "")
    authority = url.raw_authority.rpartition("@")[2]
    clone = request.clone(rel_url=URL(target, encoded=True), host=authority)
    clone[AUTHORITY_KEY] = authority
    return clone
