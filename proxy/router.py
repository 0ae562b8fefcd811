"""Ordered routing rules: the first route that matches names the cluster."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.config import Route


@dataclass(frozen=True, slots=True)
class Match:
    route_class: str
    cluster: str


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)
        self._matches = tuple(Match(r.name, r.cluster) for r in self._routes)

    def match(self, host: str, path: str, method: str, headers: Mapping[str, str]) -> Match | None:
        for route, result in zip(self._routes, self._matches, strict=True):
            if not path.startswith(route.path_prefix):
                continue
            if route.methods is not None and method not in route.methods:
                continue
            if route.host is not None and not _host_matches(route.host, host):
                continue
            if route.headers and not _headers_match(route.headers, headers):
                continue
            return result
        return None


def _host_matches(pattern: str, host: str) -> bool:
    name = host.rsplit(":", 1)[0].lower() if not host.startswith("[") else host.lower()
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _headers_match(wanted: Mapping[str, str], headers: Mapping[str, str]) -> bool:
    for name, value in wanted.items():
        got = headers.get(name)
        if got is None or (value != "*" and got != value):
            return False
    return True
