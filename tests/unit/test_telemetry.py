"""TelemetryRecorder: real files through the writer thread, read back; rotation, budget."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from policies.base import RequestInfo
from policies.features import FEATURE_NAMES, RouteSlots, build
from proxy.config import Telemetry
from proxy.state import ERROR_TIMEOUT, Backend, Cluster, Outcome
from proxy.telemetry import (
    MAGIC,
    RECORD_DTYPE,
    SUFFIX,
    TelemetryFormatError,
    TelemetryRecorder,
    _Writer,
    read_telemetry,
)
from train.dataset import DatasetError, load_telemetry


class Clock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def cluster(clock: Clock, n: int = 3) -> Cluster:
    return Cluster("c", [Backend(f"b{i}", f"http://127.0.0.1:{9000 + i}") for i in range(n)],
                   clock=clock)


def config(tmp_path: Path, **kw: object) -> Telemetry:
    base: dict[str, object] = {"enabled": True, "path": tmp_path, "sample_rate": 1.0,
                               "flush_interval_s": 0.05}
    base.update(kw)
    return Telemetry.model_validate(base)


async def test_round_trip_features_propensity_outcome(tmp_path: Path) -> None:
    clock = Clock()
    c = cluster(clock)
    rec = TelemetryRecorder(config(tmp_path), ["api"], worker_id=3, rng=random.Random(1),
                            clock=clock, wall=lambda: 1.7e9)
    await rec.start()
    ready = c.ready()
    req = RequestInfo(route_class="api", body_size=10)
    expected = build(ready, req, RouteSlots(["api"]), clock())
    tok = rec.on_pick("c", ready, req, ready[1], 0.25)
    rec.on_outcome(tok, Outcome(200, 0.012, None, 0, "api"))
    tok = rec.on_pick("c", ready, req, ready[2], None)
    rec.on_outcome(tok, Outcome(0, 1.5, ERROR_TIMEOUT, 0, "api"))
    await rec.stop()
    files = sorted(tmp_path.glob(f"*{SUFFIX}"))
    assert len(files) == 1 and files[0].read_bytes().startswith(MAGIC)
    tf = read_telemetry(files[0])
    assert tf.header["feature_names"] == list(FEATURE_NAMES)
    assert tf.header["worker_id"] == 3 and tf.truncated_bytes == 0
    r = tf.records
    assert len(r) == 6
    first = r[:3]
    np.testing.assert_array_equal(first["features"], expected)
    assert list(first["chosen"]) == [0, 1, 0]
    assert np.all(first["propensity"] == np.float32(0.25))
    assert np.all(first["latency_s"] == np.float32(0.012)) and np.all(first["status"] == 200)
    assert len(set(first["decision_id"])) == 1 and first["decision_id"][0] >> 40 == 3
    second = r[3:]
    assert np.all(np.isnan(second["propensity"]))  # deterministic policy
    assert second["error_kind"][0] == 2 and second["backend"][2] == b"b2"


async def test_sampling_and_disabled(tmp_path: Path) -> None:
    clock = Clock()
    c = cluster(clock)
    rec = TelemetryRecorder(config(tmp_path, sample_rate=0.0), [], 0, clock=clock)
    assert rec.on_pick("c", c.ready(), RequestInfo(), c.ready()[0], None) is None
    rec = TelemetryRecorder(config(tmp_path, sample_rate=0.3), [], 0, rng=random.Random(7),
                            clock=clock)
    hits = sum(rec.on_pick("c", c.ready(), RequestInfo(), c.ready()[0], None) is not None
               for _ in range(2000))
    assert 500 < hits < 700


async def test_rotation_and_disk_budget(tmp_path: Path) -> None:
    clock = Clock()
    c = cluster(clock, 8)
    row_bytes = RECORD_DTYPE.itemsize * 8
    cfg = config(tmp_path, max_file_bytes=4 * row_bytes, max_total_bytes=12 * row_bytes,
                 flush_interval_s=10.0)
    rec = TelemetryRecorder(cfg, [], 0, clock=clock)
    await rec.start()
    ready = c.ready()
    for i in range(40):
        tok = rec.on_pick("c", ready, RequestInfo(), ready[i % 8], 1.0)
        rec.on_outcome(tok, Outcome(200, 0.01))
        if i % 5 == 4:
            # Flush in small batches: stop() drains and closes; start() again continues.
            await rec.stop()
            await rec.start()
    await rec.stop()
    files = list(tmp_path.glob(f"*{SUFFIX}"))
    total = sum(f.stat().st_size for f in files)
    assert len(files) >= 2
    assert total <= cfg.max_total_bytes
    # What remains is the most recent data, readable.
    assert all(len(read_telemetry(f).records) > 0 for f in files)


async def test_truncated_and_foreign_files(tmp_path: Path) -> None:
    clock = Clock()
    c = cluster(clock)
    rec = TelemetryRecorder(config(tmp_path), [], 0, clock=clock)
    await rec.start()
    for _ in range(30):  # the chosen backend's record is a decision's last
        tok = rec.on_pick("c", c.ready(), RequestInfo(), c.ready()[-1], 0.5)
        rec.on_outcome(tok, Outcome(200, 0.01))
    await rec.stop()
    (f,) = tmp_path.glob(f"*{SUFFIX}")
    f.write_bytes(f.read_bytes()[:-10])  # a crash mid-record
    tf = read_telemetry(f)
    assert tf.truncated_bytes == RECORD_DTYPE.itemsize - 10
    (tmp_path / f"junk{SUFFIX}").write_bytes(b"not telemetry at all")
    with pytest.raises(TelemetryFormatError):
        read_telemetry(tmp_path / f"junk{SUFFIX}")
    data = load_telemetry(tmp_path)
    lines = "\n".join(data.report.lines())
    assert "skipped junk.ftel: unreadable" in lines
    # The cut-off decision lost its chosen record too: reported as what happened to it.
    assert "truncated" in lines and "incomplete decision" in lines
    assert "not exactly one chosen" not in lines
    assert len(data.chosen()) == 29


async def test_malformed_rows_dropped_and_counted(tmp_path: Path) -> None:
    clock = Clock()
    c = cluster(clock)
    rec = TelemetryRecorder(config(tmp_path), [], 0, clock=clock)
    await rec.start()
    picked = [rec.on_pick("c", c.ready(), RequestInfo(), c.ready()[0], 0.5) for _ in range(10)]
    toks = [t for t in picked if t is not None]
    assert len(toks) == 10
    toks[0].records["features"][1, 0] = math.nan
    toks[1].records["propensity"] = 1.5
    for i, t in enumerate(toks):
        rec.on_outcome(t, Outcome(200, -1.0 if i == 2 else 0.01))
    await rec.stop()
    data = load_telemetry(tmp_path)
    dropped = data.report.dropped_total()
    assert dropped["non-finite feature"] == 1
    assert dropped["propensity outside (0, 1]"] == 1
    assert dropped["bad latency"] == 1
    assert len(data.chosen()) == 7


def test_no_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no telemetry files"):
        load_telemetry(tmp_path)


def _rows(n: int, first_id: int) -> np.ndarray:
    r = np.zeros(n, dtype=RECORD_DTYPE)
    r["decision_id"] = np.arange(first_id, first_id + n)
    r["n_ready"], r["chosen"], r["status"], r["propensity"] = 1, 1, 200, 1.0
    r["latency_s"], r["backend"], r["time_s"] = 0.01, b"b0", 1e9
    return r


def test_a_workers_open_file_survives_another_workers_budget(tmp_path: Path) -> None:
    """Workers share the directory; an idle worker's open file is the oldest there."""
    row_bytes = RECORD_DTYPE.itemsize
    cfg = config(tmp_path, max_file_bytes=64 * row_bytes, max_total_bytes=128 * row_bytes)
    wall = iter(range(1_000_000, 2_000_000, 10)).__next__
    idle = _Writer(cfg, [], 1, lambda: float(wall()))
    idle.write(_rows(10, 1))
    busy = _Writer(cfg, [], 0, lambda: float(wall()))
    for i in range(8):  # rotates and enforces the budget several times
        busy.write(_rows(40, 1000 + 40 * i))
    assert idle.current is not None and idle.current.exists()
    idle.write(_rows(5, 11))
    idle.close()
    busy.close()
    assert len(read_telemetry(idle.current).records) == 15
    assert sum(f.stat().st_size for f in tmp_path.glob(f"*{SUFFIX}")) \
        <= cfg.max_total_bytes + cfg.max_file_bytes  # over only by the idle worker's file


def test_a_write_that_fails_part_way_leaves_whole_records(tmp_path: Path) -> None:
    """Disk full mid-batch: the file is cut back to its last whole record, so the rows
    written once space is back read as they were written."""
    w = _Writer(config(tmp_path), [], 0, lambda: 1e9)
    w.write(_rows(100, 1))
    real = w._file

    class DiskFull:
        def write(self, data: bytes) -> int:
            real.write(bytes(data)[:1000])  # part of the batch reaches the disk
            raise OSError(28, "No space left on device")

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    w._file = DiskFull()
    with pytest.raises(OSError):
        w.write(_rows(100, 101))
    w._file = real
    w.write(_rows(100, 201))
    w.close()
    assert w.current is not None
    tf = read_telemetry(w.current)
    assert tf.truncated_bytes == 0
    assert tf.records["decision_id"].tolist() == [*range(1, 101), *range(201, 301)]


def test_a_file_larger_than_the_whole_budget_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"max_file_bytes .* must not exceed max_total_bytes"):
        config(tmp_path, max_file_bytes=64 * 1024, max_total_bytes=16 * 1024)


def test_files_of_two_route_class_lists_are_refused_naming_a_file_of_each(tmp_path: Path) -> None:
    for worker, routes in ((0, ["api"]), (1, ["api", "render"])):
        w = _Writer(config(tmp_path), routes, worker, lambda: 1e9)
        w.write(_rows(3, 1))
        w.close()
    with pytest.raises(DatasetError) as err:
        load_telemetry(tmp_path)
    message = str(err.value)
    assert "['api'] in 1 file(s), e.g. telemetry-w0-" in message
    assert "['api', 'render'] in 1 file(s), e.g. telemetry-w1-" in message


def test_a_disk_that_stays_full_costs_batches_not_the_writer(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full: the cut back to the last whole record fails too (truncate flushes first),
    and so does close. The writer drops its file and opens a new one once space is back."""
    import errno
    import io

    import proxy.telemetry as telemetry

    free = [10**9]

    class Disk(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            room = free[0] - sum(len(d.data) for d in disks)  # one disk for all files
            if room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            chunk = bytes(b)[:room]  # type: ignore[call-overload]
            self.data += chunk
            return len(chunk)

        def seek(self, pos: int, whence: int = 0) -> int:
            return pos

        def truncate(self, size: int | None = None) -> int:
            del self.data[size:]
            return size or 0

    disks: list[Disk] = []

    def open_on_disk(path: object, mode: str) -> io.BufferedWriter:
        disks.append(Disk())
        return io.BufferedWriter(disks[-1])

    def open_on_disk_and_in_dir(path: Path, mode: str) -> io.BufferedWriter:
        path.touch()  # the directory entry a real open makes
        return open_on_disk(path, mode)

    monkeypatch.setattr(telemetry, "open", open_on_disk_and_in_dir, raising=False)
    w = _Writer(config(tmp_path), [], 0, lambda: 1e9)
    w.write(_rows(2, 1))
    free[0] = len(disks[0].data) + 100  # part of the next batch fits
    for first in range(3, 13, 2):
        with pytest.raises(OSError):
            w.write(_rows(2, first))
    free[0] = 10**9
    w.write(_rows(2, 13))  # a new file
    assert len(disks) >= 2 and w._file is not None and not w._file.closed
    # The first file and the new one; none left empty by the batches on the full disk.
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 2
