"""Consistent hashing for sticky routing: a ketama ring keyed by backend id.

Each backend owns `virtual_nodes * weight` points on a 64-bit ring, placed by
hashing "<backend id>#<i>"; a request goes to the owner of the first point at
or after the hash of its key. Points depend only on the backend's own id, so
when one backend leaves only the keys it owned move (about 1/N of them) and
when one joins it takes about 1/(N+1) of the keys, all from the others.

The key is a request header, a cookie, or (default) the client IP; when the
configured header or cookie is missing the client IP is used, and with no
client IP either the pick is uniformly random.

Rings are built only when the ready set changes and kept in a small cache by
the tuple of backend ids, so a retry that excludes one backend (a different
ready set) does not rebuild on every request. Failure penalty and slow start
do not apply: they would break stickiness; health removes sick backends.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from typing import ClassVar

from pydantic import Field, model_validator

from policies.base import BackendView, PolicyContext, PolicyOptions, RequestInfo

_MAX_RINGS = 8


def hash64(data: str) -> int:
    """A stable 64-bit hash (Python's hash() is salted per process)."""
    return int.from_bytes(blake2b(data.encode(), digest_size=8).digest(), "big")


class Ring:
    """Sorted points and, for each, the position of its owner in the ready sequence."""

    __slots__ = ("owners", "points")

    def __init__(self, ids: Sequence[str], weights: Sequence[int], virtual_nodes: int) -> None:
        pairs: list[tuple[int, int]] = []
        for pos, (backend_id, weight) in enumerate(zip(ids, weights, strict=True)):
            for i in range(virtual_nodes * weight):
                pairs.append((hash64(f"{backend_id}#{i}"), pos))
        # Sort by point, then by id so a (vanishingly rare) collision resolves
        # the same way whatever the ready order.
        pairs.sort(key=lambda p: (p[0], ids[p[1]]))
        self.points = [p for p, _ in pairs]
        self.owners = [pos for _, pos in pairs]

    def lookup(self, key_hash: int) -> int:
        i = bisect_left(self.points, key_hash)
        return self.owners[i if i < len(self.points) else 0]


def cookie_value(cookie_header: str, name: str) -> str | None:
    for part in cookie_header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def _header(headers: object, name: str) -> str | None:
    get = getattr(headers, "get", None)
    if get is None:
        return None
    value = get(name)
    if value is None:
        value = get(name.lower())
    return value if isinstance(value, str) else None


class ConsistentHash:
    name: ClassVar[str] = "consistent_hash"

    class Options(PolicyOptions):
        # Hash this request header's value...
        header: str | None = Field(default=None, min_length=1)
        # ...or this cookie's value; neither set: the client IP.
        cookie: str | None = Field(default=None, min_length=1)
        # Points per unit of weight (ketama uses 160).
        virtual_nodes: int = Field(default=160, ge=1, le=4096)

        @model_validator(mode="after")
        def _one_key_source(self) -> ConsistentHash.Options:
            if self.header is not None and self.cookie is not None:
                raise ValueError("set at most one of header and cookie")
            return self

    def __init__(self, options: Options, ctx: PolicyContext) -> None:
        self.options = options
        self._rng = ctx.rng
        self._rings: OrderedDict[tuple[str, ...], Ring] = OrderedDict()
        self._ready: Sequence[BackendView] | None = None
        self._ring: Ring | None = None

    def ring_for(self, ready: Sequence[BackendView]) -> Ring:
        if ready is self._ready and self._ring is not None:
            return self._ring
        ids = tuple(b.id for b in ready)
        ring = self._rings.get(ids)
        if ring is None:
            ring = Ring(ids, [b.weight for b in ready], self.options.virtual_nodes)
            self._rings[ids] = ring
            if len(self._rings) > _MAX_RINGS:
                self._rings.popitem(last=False)
        else:
            self._rings.move_to_end(ids)
        self._ready, self._ring = ready, ring
        return ring

    def key(self, req: RequestInfo) -> str | None:
        """The hash key of a request, or None when it has none at all."""
        opts = self.options
        value: str | None = None
        if opts.header is not None:
            value = _header(req.headers, opts.header)
        elif opts.cookie is not None:
            cookie = _header(req.headers, "Cookie")
            if cookie:
                value = cookie_value(cookie, opts.cookie)
        if value:
            return value
        return req.client_ip or None

    def pick(self, ready: Sequence[BackendView], req: RequestInfo) -> BackendView | None:
        n = len(ready)
        if n == 0:
            return None
        if n == 1:
            return ready[0]
        key = self.key(req)
        if key is None:
            return ready[int(self._rng.random() * n)]
        return ready[self.ring_for(ready).lookup(hash64(key))]

    def __repr__(self) -> str:
        return f"ConsistentHash({self.options!r})"
