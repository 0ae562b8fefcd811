"""The supervisor's restart decisions (proxy/main.py), on an injected clock."""

from __future__ import annotations

import signal

from proxy.main import STABLE_S, START_ATTEMPTS, Slot, describe_exit, restart_delay_s


def test_restart_waits_double_after_the_first() -> None:
    assert [restart_delay_s(n) for n in range(1, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert restart_delay_s(100) == 30.0


def test_a_worker_that_never_serves_is_given_up_on() -> None:
    slot = Slot(0)
    delays = [slot.on_exit(now=float(t)) for t in range(START_ATTEMPTS)]
    assert delays == [0.0, 0.5, 1.0, 2.0, None]


def test_a_worker_that_served_is_never_given_up_on_and_once_stable_restarts_at_once() -> None:
    slot = Slot(1)
    slot.on_exit(now=0.0)  # one failed start...
    delays = []
    for t in range(1, 7):  # ...then workers that serve, each dying within a second
        slot.ready_at = 10.0 * t
        delays.append(slot.on_exit(now=10.0 * t + 1))
    assert slot.start_failures == 0
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    slot.ready_at = 100.0
    assert slot.on_exit(now=100.0 + STABLE_S) == 0.0


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(2) == "exited with code 2"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(-200) == "was killed by signal 200"
