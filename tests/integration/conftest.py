from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.worker import Worker
from tests.support import Backends, write_config


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    fleet = Backends()
    yield fleet
    await fleet.close()


class InProcessProxy:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.url = f"http://127.0.0.1:{worker.listen_port}"
        self.admin_url = f"http://127.0.0.1:{worker.admin_port}"


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[InProcessProxy]]]:
    """Start a real proxy worker in this event loop on ephemeral loopback ports."""
    workers: list[Worker] = []

    async def start(cfg: dict[str, Any]) -> InProcessProxy:
        path = write_config(tmp_path / f"config-{len(workers)}.yaml", cfg)
        worker = Worker(path)
        await worker.start()
        workers.append(worker)
        return InProcessProxy(worker)

    yield start
    for worker in workers:
        await worker.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
