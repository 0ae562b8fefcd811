"""Consistent hashing: stickiness, ~1/N remapping, balance, key sources, ring caching."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from policies import registry
from policies.base import PolicyContext, RequestInfo
from policies.consistent_hash import ConsistentHash, cookie_value
from policies.registry import PolicyError, validate_options
from proxy.state import Health
from tests.unit.policy_sim import FakeClock, make_cluster

KEYS = [f"user-{i}" for i in range(5000)]


def _policy(seed: int = 1, **options: object) -> ConsistentHash:
    policy = registry.create("consistent_hash", options,
                             PolicyContext(clock=FakeClock(), rng=random.Random(seed)))
    assert isinstance(policy, ConsistentHash)
    return policy


def _req(key: str) -> RequestInfo:
    return RequestInfo(headers={"x-user": key}, client_ip="10.0.0.1")


def _mapping(policy: ConsistentHash, ready: tuple[object, ...]) -> dict[str, str]:
    return {k: policy.pick(ready, _req(k)).id for k in KEYS}  # type: ignore[arg-type, union-attr]


def test_empty_ready_list() -> None:
    assert _policy().pick((), RequestInfo()) is None


def test_same_key_same_backend_across_instances() -> None:
    # The hash is stable (not Python's salted hash()), so two proxies agree.
    cluster = make_cluster(FakeClock(), n=8)
    a = _mapping(_policy(1, header="x-user"), cluster.ready())
    b = _mapping(_policy(2, header="x-user"), cluster.ready())
    assert a == b
    assert len(set(a.values())) == 8


def test_balance_with_virtual_nodes() -> None:
    cluster = make_cluster(FakeClock(), n=8)
    counts = Counter(_mapping(_policy(header="x-user"), cluster.ready()).values())
    # 160 points per backend: each owns its 1/8 within +-30%.
    for bid, c in counts.items():
        assert abs(c / len(KEYS) - 1 / 8) < 0.3 / 8, (bid, counts)


def test_weights_scale_the_share() -> None:
    cluster = make_cluster(FakeClock(), {"a": 1, "b": 3})
    counts = Counter(_mapping(_policy(header="x-user"), cluster.ready()).values())
    assert counts["b"] / len(KEYS) == pytest.approx(0.75, abs=0.06)


def test_removing_one_backend_moves_only_its_keys() -> None:
    cluster = make_cluster(FakeClock(), n=10)
    policy = _policy(header="x-user")
    before = _mapping(policy, cluster.ready())
    cluster.set_health("b3", Health.EJECTED, "test")
    after = _mapping(policy, cluster.ready())
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "b3"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 10, abs=0.04)
    # And back: the original mapping exactly.
    cluster.set_health("b3", Health.HEALTHY, "test")
    assert _mapping(policy, cluster.ready()) == before


def test_adding_one_backend_takes_about_one_in_n_plus_one() -> None:
    clock = FakeClock()
    cluster = make_cluster(clock, n=10)
    policy = _policy(header="x-user")
    before = _mapping(policy, cluster.ready())
    grown = make_cluster(clock, n=11)
    after = _mapping(policy, grown.ready())
    moved = {k for k in KEYS if before[k] != after[k]}
    assert {after[k] for k in moved} == {"b10"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / 11, abs=0.04)


def test_key_sources_and_fallbacks() -> None:
    cluster = make_cluster(FakeClock(), n=16)
    ready = cluster.ready()
    by_ip = _policy()
    by_header = _policy(header="X-Session")
    by_cookie = _policy(cookie="sid")
    ip_req = RequestInfo(client_ip="192.0.2.7")
    chosen = by_ip.pick(ready, ip_req)
    assert chosen is not None
    # Header and cookie with the same value hash to the same backend as that value as an IP.
    assert by_header.pick(ready, RequestInfo(headers={"X-Session": "192.0.2.7"})) is chosen
    assert by_header.pick(ready, RequestInfo(headers={"x-session": "192.0.2.7"})) is chosen
    cookie = "theme=dark; sid=192.0.2.7; lang=en"
    assert by_cookie.pick(ready, RequestInfo(headers={"Cookie": cookie})) is chosen
    # Missing header or cookie: the client IP decides.
    assert by_header.pick(ready, ip_req) is chosen
    assert by_cookie.pick(ready, RequestInfo(client_ip="192.0.2.7", headers={"Cookie": "a=b"})) is chosen
    # No key at all: uniformly random, so it spreads.
    spread = {by_ip.pick(ready, RequestInfo()).id for _ in range(200)}  # type: ignore[union-attr]
    assert len(spread) > 8


def test_cookie_value_parsing() -> None:
    assert cookie_value("a=1; sid=xyz; b=2", "sid") == "xyz"
    assert cookie_value('sid="quoted"', "sid") == "quoted"
    assert cookie_value("sidx=1; xsid=2", "sid") is None
    assert cookie_value("", "sid") is None


def test_ring_is_built_per_ready_set_not_per_request() -> None:
    cluster = make_cluster(FakeClock(), n=4)
    policy = _policy()
    ring = policy.ring_for(cluster.ready())
    assert policy.ring_for(cluster.ready()) is ring
    cluster.set_health("b1", Health.EJECTED, "test")
    smaller = policy.ring_for(cluster.ready())
    assert smaller is not ring
    cluster.set_health("b1", Health.HEALTHY, "test")
    # A new tuple with the same ids: the cached ring, not a rebuild.
    assert policy.ring_for(cluster.ready()) is ring


def test_header_and_cookie_are_exclusive() -> None:
    with pytest.raises(PolicyError, match="at most one"):
        validate_options("consistent_hash", {"header": "x", "cookie": "y"})
