"""Telemetry directory -> validated records of one schema, with a report of what was dropped.

Reads the `*.ftel` files written by proxy.telemetry (format documented
there). Nothing is dropped silently: every skipped file and every dropped
decision is counted by reason and file in `LoadReport`, which the CLI prints.

Rules:
- a file that cannot be read or has a bad header is skipped (reason "unreadable");
- a partial last record (a crash mid-write) is dropped ("truncated bytes");
- files of another schema version or feature list are never mixed in: the
  load fails unless `skip_other_schemas=True`, and then they are skipped and
  listed;
- files whose route classes differ from the majority are treated the same way
  (their one-hot slots would mean something else);
- a decision is dropped whole when any of its records is malformed: a
  non-finite feature, a latency that is negative/non-finite/absurd, a
  propensity outside (0, 1], not exactly one chosen record, or fewer records
  than its `n_ready` (cut off).

`Telemetry.spans` says when some proxy process was recording: the files one
process wrote (one worker's files from sequence number 1 of their names on,
see proxy.telemetry) cover the time from their first record to their last;
the time between two processes' files (a restart, days between runs) is
not covered, so counting decisions per interval (train.forecast) does not
read it as intervals without requests.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policies.features import FEATURE_NAMES, SCHEMA_VERSION
from proxy.telemetry import SUFFIX, TelemetryFormatError, parse_file_name, read_telemetry

MAX_LATENCY_S = 3600.0


class DatasetError(Exception):
    """Telemetry that cannot be trained on; the message says which files and why."""


@dataclass
class FileReport:
    path: Path
    records: int = 0
    kept_records: int = 0
    truncated_bytes: int = 0
    skipped: str = ""  # why the whole file was skipped, "" when used
    dropped: Counter[str] = field(default_factory=Counter)  # decisions dropped by reason


@dataclass
class LoadReport:
    files: list[FileReport] = field(default_factory=list)

    @property
    def used_files(self) -> list[FileReport]:
        return [f for f in self.files if not f.skipped]

    def dropped_total(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for f in self.files:
            total.update(f.dropped)
        return total

    def lines(self) -> list[str]:
        out = []
        used = self.used_files
        out.append(f"{len(self.files)} file(s): {len(used)} used, "
                   f"{len(self.files) - len(used)} skipped; "
                   f"{sum(f.kept_records for f in used)} records kept")
        for f in self.files:
            if f.skipped:
                out.append(f"  skipped {f.path.name}: {f.skipped}")
                continue
            notes = []
            if f.truncated_bytes:
                notes.append(f"truncated: dropped a partial record of {f.truncated_bytes} bytes")
            if f.dropped:
                notes.append("dropped decisions: " + ", ".join(
                    f"{n} {reason}" for reason, n in sorted(f.dropped.items())))
            if notes:
                out.append(f"  {f.path.name}: " + "; ".join(notes))
        return out


@dataclass
class Telemetry:
    """Valid records (all candidates of each kept decision), sorted by (time, decision)."""

    records: np.ndarray
    route_classes: list[str]
    sample_rates: list[float]
    report: LoadReport
    # (start, end) epoch seconds when some proxy process was recording, merged and in
    # order; empty: not known (one span over all records).
    spans: list[tuple[float, float]] = field(default_factory=list)

    def chosen(self) -> np.ndarray:
        return self.records[self.records["chosen"] == 1]


def _valid_decisions(rec: np.ndarray, report: FileReport) -> np.ndarray:
    """Boolean mask over records: True for records of decisions with no malformed record."""
    if len(rec) == 0:
        return np.zeros(0, dtype=bool)
    ids, inverse, counts = np.unique(rec["decision_id"], return_inverse=True, return_counts=True)
    bad = np.zeros(len(ids), dtype=bool)

    def mark(row_mask: np.ndarray, reason: str) -> None:
        dec = np.zeros(len(ids), dtype=bool)
        dec[inverse[row_mask]] = True
        new = dec & ~bad
        if new.any():
            report.dropped[reason] += int(new.sum())
        bad[dec] = True

    mark(~np.all(np.isfinite(rec["features"]), axis=1), "non-finite feature")
    lat = rec["latency_s"]
    mark(~np.isfinite(lat) | (lat < 0) | (lat > MAX_LATENCY_S), "bad latency")
    p = rec["propensity"]
    mark(~np.isnan(p) & ((p <= 0) | (p > 1)), "propensity outside (0, 1]")
    # Incomplete first: a decision cut off by a truncated file usually lacks its chosen
    # record too, and is reported as what it is.
    n_ready = np.zeros(len(ids), dtype=np.int64)
    n_ready[inverse] = rec["n_ready"]
    incomplete = counts != n_ready
    mark(incomplete[inverse], "incomplete decision")
    chosen_per = np.bincount(inverse, weights=rec["chosen"].astype(np.float64), minlength=len(ids))
    dec_bad = chosen_per != 1
    mark(dec_bad[inverse], "not exactly one chosen")
    keep: np.ndarray = ~bad[inverse]
    return keep


def load_telemetry(directory: str | Path, *, skip_other_schemas: bool = False) -> Telemetry:
    """All valid records of the current schema under `directory` (recursively)."""
    directory = Path(directory)
    if not directory.exists():
        raise DatasetError(f"{directory}: no such directory")
    paths = sorted(directory.rglob(f"*{SUFFIX}")) if directory.is_dir() else [directory]
    if not paths:
        raise DatasetError(f"{directory}: no telemetry files (*{SUFFIX})")
    report = LoadReport()
    loaded = []
    for path in paths:
        fr = FileReport(path)
        report.files.append(fr)
        try:
            tf = read_telemetry(path)
        except (OSError, TelemetryFormatError) as exc:
            fr.skipped = f"unreadable: {exc}"
            continue
        fr.truncated_bytes = tf.truncated_bytes
        fr.records = len(tf.records)
        h = tf.header
        if str(h.get("schema_version")) != str(SCHEMA_VERSION):
            fr.skipped = (f"schema version {h.get('schema_version')} "
                          f"(this trainer reads {SCHEMA_VERSION})")
            continue
        if list(h.get("feature_names", [])) != list(FEATURE_NAMES):
            fr.skipped = (f"schema version {SCHEMA_VERSION} but other feature names "
                          "(a build whose features changed without a version bump)")
            continue
        loaded.append((fr, tf))
    other = [f for f in report.files if f.skipped.startswith("schema")]
    if other and not skip_other_schemas:
        names = ", ".join(f.path.name for f in other[:5]) + (" ..." if len(other) > 5 else "")
        raise DatasetError(
            f"{len(other)} of {len(paths)} file(s) hold another feature schema ({names}); "
            f"refusing to mix schemas. Move them away or pass --skip-other-schemas.")
    # One meaning of the route slots: the most common route-class list wins.
    votes = Counter(tuple(tf.header.get("route_classes", [])) for _, tf in loaded)
    if not votes:
        raise DatasetError(f"{directory}: no usable telemetry\n" + "\n".join(report.lines()))
    routes, _ = votes.most_common(1)[0]
    if len(votes) > 1 and not skip_other_schemas:
        example: dict[tuple[str, ...], str] = {}  # route-class list -> a file holding it
        for fr, tf in loaded:
            example.setdefault(tuple(tf.header.get("route_classes", [])), fr.path.name)
        raise DatasetError(
            "files disagree on route classes ("
            + "; ".join(f"{list(v)} in {n} file(s), e.g. {example[v]}" for v, n in votes.items())
            + "); their one-hot slots mean different things. Use one config's telemetry "
            "or pass --skip-other-schemas to keep only the most common.")
    parts = []
    rates = []
    file_spans: list[FileSpan] = []
    next_id = 0
    for fr, tf in loaded:
        if tuple(tf.header.get("route_classes", [])) != routes:
            fr.skipped = f"route classes {tf.header.get('route_classes')} differ from {list(routes)}"
            continue
        keep = _valid_decisions(tf.records, fr)
        fr.kept_records = int(keep.sum())
        kept = tf.records[keep].copy()
        # Decision ids restart with every proxy run: make them unique across files.
        _, inverse = np.unique(kept["decision_id"], return_inverse=True)
        kept["decision_id"] = next_id + inverse
        next_id += int(inverse.max()) + 1 if len(kept) else 0
        parts.append(kept)
        rates.append(float(tf.header.get("sample_rate", 1.0)))
        if len(kept):
            named = parse_file_name(fr.path.name)
            file_spans.append(FileSpan(
                int(tf.header.get("worker_id", 0)), float(tf.header.get("created_at_s", 0.0)),
                float(kept["time_s"].min()), float(kept["time_s"].max()),
                # A renamed file cannot be placed in its process: it covers itself only.
                seq=named[2] if named else None))
    records = np.concatenate(parts) if parts else np.zeros(0, dtype=loaded[0][1].records.dtype)
    if len(records) == 0:
        raise DatasetError(f"{directory}: no valid records\n" + "\n".join(report.lines()))
    order = np.lexsort((records["decision_id"], records["time_s"]))
    return Telemetry(records[order], list(routes), rates, report, run_spans(file_spans))


@dataclass(frozen=True)
class FileSpan:
    worker_id: int
    opened_s: float  # the header's created_at_s: orders one worker's files
    first_s: float  # first and last decision kept
    last_s: float
    seq: int | None  # number of the file in its process (1: the first), None if not known


def run_spans(files: list[FileSpan]) -> list[tuple[float, float]]:
    """When some process was recording: per worker, files numbered one after the other
    (1, 2, 3, ... of one process) form one span; a file that does not follow the one
    before (the first of a process, or one after a file that was skipped or deleted)
    starts another; overlapping spans merge. With several workers the union is kept:
    while one worker restarts, the intervals the others cover undercount a little."""
    spans: list[list[float]] = []
    for worker_id in sorted({f.worker_id for f in files}):
        current: list[float] | None = None
        previous: FileSpan | None = None
        for f in sorted((f for f in files if f.worker_id == worker_id),
                        key=lambda f: (f.opened_s, f.first_s)):
            follows = (previous is not None and previous.seq is not None and f.seq is not None
                       and f.seq == previous.seq + 1)
            if current is None or not follows:
                current = [f.first_s, f.last_s]
                spans.append(current)
            else:
                current[0] = min(current[0], f.first_s)
                current[1] = max(current[1], f.last_s)
            previous = f
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def decision_groups(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, chosen_index) for records sorted so each decision is contiguous.

    `starts` has one entry per decision plus the end; chosen_index[k] is the
    absolute index of decision k's chosen record.
    """
    ids = records["decision_id"]
    change = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate(([0], change, [len(ids)]))
    chosen_rows = np.flatnonzero(records["chosen"] == 1)
    return starts, chosen_rows
