"""A bad config on SIGHUP: rejected, logged with the file and what is wrong, the old one keeps serving."""

from __future__ import annotations

import logging

import pytest

from tests.support import Backends, proxy_config

BACKENDS = "backends: ['http://127.0.0.1:1']\n"


@pytest.mark.parametrize(("content", "problem"), [
    pytest.param(BACKENDS.encode() + b"# \xff\n", "not UTF-8 text: byte 0xff at line 2", id="not-utf8"),
    pytest.param(b"[" * 5000, "nested more than 100 levels deep", id="deep"),
    pytest.param(BACKENDS.encode() + b"policy: {kind: explore, base: nonsense}\n",
                 "clusters.default.policy.base: no such policy 'nonsense'", id="nested-policy"),
    pytest.param(BACKENDS.encode() + b"telemetry: {enabled: true, path: /proc/telemetry}\n",
                 "telemetry.path: cannot create /proc/telemetry", id="output-directory"),
])
async def test_a_bad_config_on_reload_is_logged_with_file_and_problem(
        backends: Backends, start_proxy, caplog: pytest.LogCaptureFixture, content: bytes,
        problem: str) -> None:
    proxy = await start_proxy(proxy_config({"a": await backends.start("a")}))
    worker = proxy.worker
    before = worker._get_proxy().runtime
    worker.config_path.write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="foretell.worker"):
        assert await worker.reload() is False
    assert worker._get_proxy().runtime is before
    assert "reload rejected" in caplog.text
    assert str(worker.config_path) in caplog.text and problem in caplog.text, caplog.text
