"""Decision-time telemetry for offline training: sampled, written off the hot path.

What is recorded
----------------
For a sampled decision (probability `telemetry.sample_rate`), one record per
*candidate* backend (every backend the policy could choose from), holding
that backend's feature row (policies.features) as computed at decision
time, whether it was chosen, the probability with which the policy chose
the chosen one, and the outcome of the attempt. All candidates are kept, not
only the chosen one, so `foretell train evaluate` can replay a new model on
the exact choice the logged policy faced (off-policy evaluation). Each retry
is its own decision. A decision whose client left before the answer has no
outcome and is not written: it is counted in
`foretell_telemetry_dropped_total{reason="client_gone"}`. Slow attempts are
the likeliest to be abandoned, so a large count there means the data
under-represents slow backends.

File format (`*.ftel`, one file per worker and rotation, little-endian)
-------------------------------------------------------------------------
    bytes 0..7     magic b"FTELEM1\\n"
    bytes 8..11    uint32 H: length of the JSON header
    next H bytes   JSON header, space-padded so records start 64-byte aligned
    rest           records of the numpy structured dtype in header["dtype"],
                   back to back (np.fromfile / np.frombuffer read them at
                   disk speed; no pandas needed)

Header keys: format ("foretell-telemetry"), format_version, schema_version,
feature_names, route_classes, error_kinds, dtype (numpy descr), worker_id,
sample_rate, created_at_s.

Record fields (`RECORD_DTYPE` for the current schema):
    decision_id  u8    (worker_id << 40) | sequence; groups the candidates
    time_s       f8    wall-clock time of the decision (epoch seconds)
    cluster      S32   cluster name (utf-8, truncated)
    backend      S64   backend id (utf-8, truncated)
    chosen       u1    1 on the chosen backend's record
    n_ready      u2    candidates in this decision
    propensity   f4    P(chosen backend | decision) as the policy reported it;
                       NaN when it reports none (no last_propensity); 1 for a
                       pick without exploration (onnx_latency with epsilon 0)
    status       i2    HTTP status of the chosen attempt (0 = no response)
    error_kind   u1    0 none, then 1 + index in header["error_kinds"]
    latency_s    f4    latency of the chosen attempt
    features     f4[N] the candidate's feature row, names in header order
The outcome fields describe the chosen attempt and are repeated on every
record of the decision.

A file cut short by a crash holds a partial last record; `read_telemetry`
drops it and says how many bytes. Files rotate at `max_file_bytes`; when the
directory holds more than `max_total_bytes` of `*.ftel`, the oldest files
(by modification time, any worker) are deleted, but never a worker's newest
(it may be open).

Cost: an unsampled request costs one RNG draw. A sampled one builds its
feature rows from scratch (~10 µs per candidate) on the event loop and
queues them; a writer thread batches and writes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter

from policies.base import BackendView, RequestInfo
from policies.features import FEATURE_NAMES, N_FEATURES, SCHEMA_VERSION, RouteSlots, build
from proxy.config import Telemetry
from proxy.state import ERROR_KINDS, Outcome

log = logging.getLogger("foretell.telemetry")

MAGIC = b"FTELEM1\n"
FORMAT_NAME = "foretell-telemetry"
FORMAT_VERSION = 1
SUFFIX = ".ftel"
ALIGN = 64
DECISION_WORKER_SHIFT = 40
# telemetry-w{worker}-{opened at, ms since the epoch}-{seq:05d}.ftel; seq 1 is the
# first file of a process.
_FILE_NAME = re.compile(r"^telemetry-w(\d+)-(\d+)-(\d+)" + re.escape(SUFFIX) + "$")


def file_name(worker_id: int, opened_ms: int, seq: int) -> str:
    return f"telemetry-w{worker_id}-{opened_ms}-{seq:05d}{SUFFIX}"


def parse_file_name(name: str) -> tuple[int, int, int] | None:
    """(worker id, opened at ms, seq) of a telemetry file's name; None for another name."""
    m = _FILE_NAME.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def record_dtype(n_features: int = N_FEATURES) -> np.dtype[Any]:
    return np.dtype([
        ("decision_id", "<u8"),
        ("time_s", "<f8"),
        ("cluster", "S32"),
        ("backend", "S64"),
        ("chosen", "u1"),
        ("n_ready", "<u2"),
        ("propensity", "<f4"),
        ("status", "<i2"),
        ("error_kind", "u1"),
        ("latency_s", "<f4"),
        ("features", "<f4", (n_features,)),
    ])


RECORD_DTYPE = record_dtype()
_ERROR_CODE = {kind: i + 1 for i, kind in enumerate(ERROR_KINDS)}

ROWS = Counter("foretell_telemetry_rows_total", "Telemetry records written (one per candidate)")
DECISIONS = Counter("foretell_telemetry_decisions_total", "Sampled decisions recorded")
DROPPED = Counter("foretell_telemetry_dropped_total", "Telemetry records dropped", ["reason"])
BYTES = Counter("foretell_telemetry_written_bytes_total", "Bytes written to telemetry files")
DELETED = Counter("foretell_telemetry_files_deleted_total",
                  "Telemetry files deleted for the budget")


class TelemetryFormatError(Exception):
    """A file that is not readable telemetry (bad magic or header)."""


def encode_header(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    pad = (-(len(MAGIC) + 4 + len(body))) % ALIGN
    body += b" " * pad
    return MAGIC + struct.pack("<I", len(body)) + body


def _tuples(obj: Any) -> Any:
    # JSON turns the descr's tuples into lists; numpy wants tuples back.
    if isinstance(obj, list):
        return [tuple(_tuples(x)) if isinstance(x, list) else x for x in obj]
    return obj


def header_for(route_classes: Sequence[str], worker_id: int, sample_rate: float,
               created_at_s: float) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "route_classes": list(route_classes),
        "error_kinds": list(ERROR_KINDS),
        "dtype": np.lib.format.dtype_to_descr(RECORD_DTYPE),
        "worker_id": worker_id,
        "sample_rate": sample_rate,
        "created_at_s": created_at_s,
    }


@dataclass
class TelemetryFile:
    path: Path
    header: dict[str, Any]
    records: np.ndarray
    truncated_bytes: int = 0


def read_telemetry(path: str | Path) -> TelemetryFile:
    """Header and records of one file; a partial trailing record is dropped and counted."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise TelemetryFormatError(f"{path}: not a telemetry file (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4 + hlen
    if start > len(data):
        raise TelemetryFormatError(f"{path}: header cut short ({len(data)} of {start} bytes)")
    try:
        header = json.loads(data[len(MAGIC) + 4:start])
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"format {header.get('format')!r}")
        dtype = np.lib.format.descr_to_dtype(_tuples(header["dtype"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TelemetryFormatError(f"{path}: bad header: {exc}") from None
    body = len(data) - start
    whole = body - body % dtype.itemsize
    records = np.frombuffer(data, dtype=dtype, count=whole // dtype.itemsize, offset=start)
    return TelemetryFile(path, header, records, truncated_bytes=body - whole)


@dataclass
class _Pending:
    """A sampled decision waiting for its outcome."""

    records: np.ndarray
    created_at: float = field(default=0.0)
    settled: bool = False  # its outcome was taken (written or counted as dropped)


class _Writer:
    """Owns the open file: rotation and the disk budget. Runs in the writer thread."""

    def __init__(self, config: Telemetry, route_classes: Sequence[str], worker_id: int,
                 wall: Callable[[], float]) -> None:
        self.config = config
        self.dir = Path(config.path)
        self.route_classes = list(route_classes)
        self.worker_id = worker_id
        self.wall = wall
        self._file: Any = None
        self.current: Path | None = None
        self._size = 0
        self._head_size = 0
        self._seq = 0

    def _open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        now = self.wall()
        self._seq += 1
        self.current = self.dir / file_name(self.worker_id, int(now * 1000), self._seq)
        self._file = open(self.current, "wb")  # noqa: SIM115 - kept open across writes
        head = encode_header(header_for(self.route_classes, self.worker_id,
                                        self.config.sample_rate, now))
        self._file.write(head)
        self._size = self._head_size = len(head)
        BYTES.inc(len(head))

    def write(self, batch: np.ndarray) -> None:
        if self._file is None:
            self._open()
            self.enforce_budget()
        payload = batch.tobytes()
        try:
            self._file.write(payload)
            self._file.flush()
        except OSError:
            # Part of the batch may be on disk (disk full): cut the file back to its last
            # whole record, or every later record would start mid-record. If even that
            # fails, the file ends here and the next batch opens a new one.
            try:
                self._file.truncate(self._size)
                self._file.seek(self._size)
            except OSError:
                # (truncate flushes first, so a disk still full fails here, and close too)
                f, self._file = self._file, None
                with contextlib.suppress(OSError):
                    f.close()
                if self._size == self._head_size and self.current is not None:
                    # No record in it: removed, or a disk that stays full would collect
                    # an empty file per batch.
                    with contextlib.suppress(OSError):
                        self.current.unlink()
            raise
        self._size += len(payload)
        BYTES.inc(len(payload))
        ROWS.inc(len(batch))
        if self._size >= self.config.max_file_bytes:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self.enforce_budget()

    def enforce_budget(self) -> None:
        """Delete the oldest *.ftel files until the directory fits max_total_bytes, but
        never a worker's newest file: other workers share the directory, and the file
        one of them writes now would be unlinked under it (its rows lost unseen). A
        stopped worker's last file stays too: at most one file per worker id."""
        files: list[tuple[float, str, int, Path]] = []
        newest: dict[int, tuple[int, int, str]] = {}  # worker -> (opened ms, seq, name)
        for p in self.dir.glob(f"*{SUFFIX}"):
            try:
                st = p.stat()
            except FileNotFoundError:  # another worker deleted it
                continue
            files.append((st.st_mtime, p.name, st.st_size, p))
            parsed = parse_file_name(p.name)
            if parsed is not None:
                worker, opened_ms, seq = parsed
                newest[worker] = max(newest.get(worker, (-1, -1, "")), (opened_ms, seq, p.name))
        in_use = {name for _, _, name in newest.values()}
        total = sum(f[2] for f in files)
        for _, name, size, p in sorted(files):
            if total <= self.config.max_total_bytes:
                break
            if name in in_use or (p == self.current and self._file is not None):
                continue
            try:
                p.unlink()
                DELETED.inc()
            except FileNotFoundError:
                pass
            total -= size


_STOP = object()


class TelemetryRecorder:
    """Samples decisions, joins them with their outcomes, hands them to a writer thread.

    The proxy calls, per attempt: `token = on_pick(cluster, candidates, req,
    chosen, propensity)` right after the pick and `on_outcome(token, outcome)`
    when the attempt ended. `start()`/`stop()` run and drain the writer.
    """

    def __init__(self, config: Telemetry, route_classes: Sequence[str], worker_id: int, *,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.slots = RouteSlots(route_classes)
        self.worker_id = worker_id
        self._rng = rng or random.Random()
        self._clock = clock
        self._wall = wall
        self._seq = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queued_rows = 0  # approximate; only for the backlog bound
        self._thread: threading.Thread | None = None
        self._writer = _Writer(config, self.slots.classes, worker_id, wall)
        self.failed: BaseException | None = None

    @property
    def current_file(self) -> Path | None:
        return self._writer.current

    # -- hot path -------------------------------------------------------------
    def on_pick(self, cluster: str, ready: Sequence[BackendView], req: RequestInfo,
                chosen: BackendView | None, propensity: float | None) -> _Pending | None:
        if (not self.config.enabled or chosen is None or not ready
                or self._rng.random() >= self.config.sample_rate):
            return None
        n = len(ready)
        rec = np.zeros(n, dtype=RECORD_DTYPE)
        rec["features"] = build(ready, req, self.slots, self._clock())
        self._seq += 1
        rec["decision_id"] = (self.worker_id << DECISION_WORKER_SHIFT) | self._seq
        rec["time_s"] = self._wall()
        rec["cluster"] = cluster.encode()[:32]
        rec["backend"] = [s.id.encode()[:64] for s in ready]
        chosen_id = chosen.id
        rec["chosen"] = [s.id == chosen_id for s in ready]
        rec["n_ready"] = n
        rec["propensity"] = math.nan if propensity is None else propensity
        return _Pending(rec)

    def on_outcome(self, token: _Pending | None, outcome: Outcome) -> None:
        if token is None:
            return
        token.settled = True
        rec = token.records
        rec["status"] = outcome.status
        rec["latency_s"] = outcome.latency_s
        rec["error_kind"] = 0 if outcome.error_kind is None else _ERROR_CODE.get(
            outcome.error_kind, len(ERROR_KINDS) + 1)
        if self._queued_rows + len(rec) > self.config.max_pending_rows:
            DROPPED.labels("backlog").inc(len(rec))
            return
        self._queued_rows += len(rec)
        DECISIONS.inc()
        self._queue.put(rec)

    def on_attempt_end(self, token: _Pending | None) -> None:
        """The attempt of a sampled decision is over: if it ended without an outcome
        (the client left, or its body broke), the decision is counted as dropped."""
        if token is not None and not token.settled:
            token.settled = True
            DROPPED.labels("client_gone").inc(len(token.records))

    # -- background -----------------------------------------------------------
    async def start(self) -> None:
        if not self.config.enabled or self._thread is not None:
            return
        Path(self.config.path).mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="foretell-telemetry", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Write what is queued and close the file."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join)
        self._thread = None

    def _run(self) -> None:
        flush_s = self.config.flush_interval_s
        batch: list[np.ndarray] = []
        deadline = time.monotonic() + flush_s
        stopping = False
        while not stopping:
            timeout = max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
            except queue.Empty:
                pass
            if batch and (stopping or time.monotonic() >= deadline
                          or sum(len(b) for b in batch) >= 4096):
                rows = np.concatenate(batch)
                batch.clear()
                self._queued_rows = max(0, self._queued_rows - len(rows))
                try:
                    self._writer.write(rows)
                except (OSError, ValueError) as exc:
                    # Never take the proxy down for telemetry: count, log, go on (a
                    # ValueError is a file closed under us; the next batch opens a new one).
                    DROPPED.labels("write_error").inc(len(rows))
                    log.error("telemetry write failed: %s", exc)
                    self.failed = exc
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + flush_s
        try:
            self._writer.close()
        except OSError as exc:
            log.error("telemetry close failed: %s", exc)
