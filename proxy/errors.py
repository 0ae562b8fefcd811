"""Answers the proxy gives itself: a status, a short body and a reason header."""

from __future__ import annotations

from aiohttp import web

ERROR_HEADER = "x-foretell-error"

# reason -> HTTP status. Reasons are bounded: they are metric label values.
BAD_REQUEST = "bad_request"
NO_ROUTE = "no_route"
NO_BACKEND = "no_healthy_backend"
CONNECT_FAILURE = "upstream_connect_failure"
RESET = "upstream_reset"
# A retry-worthy 5xx was held back for a retry that could not happen after all.
UPSTREAM_ERROR_STATUS = "upstream_error_status"
TIMEOUT = "upstream_timeout"
BODY_TOO_LARGE = "request_body_too_large"
HEADERS_TOO_LARGE = "request_headers_too_large"
NOT_IMPLEMENTED = "not_implemented"
VERSION_NOT_SUPPORTED = "http_version_not_supported"
# Still in progress when SIGTERM's drain_s ran out.
SHUTTING_DOWN = "shutting_down"

STATUS = {
    BAD_REQUEST: 400,
    NO_ROUTE: 404,
    BODY_TOO_LARGE: 413,
    HEADERS_TOO_LARGE: 431,
    NOT_IMPLEMENTED: 501,
    CONNECT_FAILURE: 502,
    RESET: 502,
    UPSTREAM_ERROR_STATUS: 502,
    NO_BACKEND: 503,
    SHUTTING_DOWN: 503,
    TIMEOUT: 504,
    VERSION_NOT_SUPPORTED: 505,
}


def error_response(reason: str, detail: str = "", *, close: bool = False) -> web.Response:
    status = STATUS[reason]
    text = f"{status} {reason}" + (f": {detail}" if detail else "") + "\n"
    resp = web.Response(status=status, text=text, headers={ERROR_HEADER: reason})
    if close:
        resp.force_close()
    return resp
