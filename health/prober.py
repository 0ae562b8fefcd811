"""Active HTTP probing: one GET, and rise/fall hysteresis over the results.

`HttpProber` does the I/O with its own small aiohttp session (never the
proxy's pool, so a probe measures a fresh path to the backend and cannot be
starved by traffic). `ProbeTracker` is pure: it flips a backend down after
`fall` failures in a row and up after `rise` successes in a row (HAProxy).
"""

from __future__ import annotations

import ssl as ssl_module
import time

import aiohttp

from health.base import ProbeResult
from health.config import ActiveProbe
from proxy.state import Backend, Clock


class HttpProber:
    def __init__(self, config: ActiveProbe, *, clock: Clock = time.monotonic,
                 ssl: ssl_module.SSLContext | bool | None = None) -> None:
        self.config = config
        self._clock = clock
        self._ssl = ssl
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=16, force_close=True,
                                             ssl=self._ssl if self._ssl is not None else True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
                skip_auto_headers=("User-Agent",), headers={"user-agent": "foretell-health"},
                auto_decompress=False)
        return self._session

    async def probe(self, backend: Backend) -> ProbeResult:
        url = backend.url + self.config.path
        started = self._clock()
        try:
            async with self._get_session().get(url, allow_redirects=False) as resp:
                await resp.read()
                rtt_s = self._clock() - started
                ok = resp.status in self.config.expected_statuses
                return ProbeResult(ok, rtt_s, resp.status,
                                   "" if ok else f"unexpected status {resp.status}")
        except TimeoutError:
            return ProbeResult(False, self._clock() - started, 0,
                               f"timeout after {self.config.timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            return ProbeResult(False, self._clock() - started, 0,
                               f"connect error: {exc.os_error.strerror or exc.os_error}")
        except (aiohttp.ClientError, OSError) as exc:
            return ProbeResult(False, self._clock() - started, 0,
                               f"{type(exc).__name__}: {exc}"[:200])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class ProbeTracker:
    """Rise/fall hysteresis for one backend. Starts up, as HAProxy does after start-up."""

    __slots__ = ("failures", "fall", "last", "rise", "successes", "up")

    def __init__(self, rise: int, fall: int) -> None:
        self.rise = rise
        self.fall = fall
        self.up = True
        self.successes = 0
        self.failures = 0
        self.last: ProbeResult | None = None

    def observe(self, result: ProbeResult) -> bool:
        """Record one probe; returns whether `up` flipped."""
        self.last = result
        if result.ok:
            self.successes += 1
            self.failures = 0
            if not self.up and self.successes >= self.rise:
                self.up = True
                return True
        else:
            self.failures += 1
            self.successes = 0
            if self.up and self.failures >= self.fall:
                self.up = False
                return True
        return False

    def mark_down(self) -> None:
        """After a passive ejection: the backend must pass `rise` fresh probes to return."""
        self.up = False
        self.successes = 0

    def describe(self) -> str:
        state = "up" if self.up else "down"
        last = self.last.describe() if self.last else "not probed yet"
        return f"{state} ({self.successes} ok / {self.failures} failed in a row; last {last})"

