"""Load config.yaml and validate everything the proxy will build from it.

`proxy.config` checks structure; this module also checks what needs other
packages or the file system: policy options (by each policy's own model,
nested policies included), model, certificate and coefficient files that
must be readable, and the places output files go. So `check-config`,
start-up and SIGHUP reload all reject the same files with the same messages.
Nothing here writes (a probe file is removed at once) or looks a name up.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policies.registry import PolicyError, validate_options
from proxy.config import Config, invalid_config, read_config

# (dotted field, what is wrong with it)
Problem = tuple[str, str]


@dataclass(frozen=True)
class Loaded:
    config: Config
    source: Path
    # Validated policy options per cluster name.
    policy_options: dict[str, Any]
    # Anomaly models loaded while validating, per cluster name: the health checker takes
    # them instead of loading the files again.
    anomaly_models: dict[str, Any] = field(default_factory=dict)


def validate(config: Config, source: str | Path) -> Loaded:
    """Everything the proxy will build from `config`; ConfigError lists every problem."""
    problems: list[Problem] = []
    options: dict[str, Any] = {}
    anomaly_models: dict[str, Any] = {}
    for name, cluster in config.clusters.items():
        where = f"clusters.{name}"
        try:
            options[name] = validate_options(cluster.policy.kind, cluster.policy.options)
        except PolicyError as exc:
            problems += [(f"{where}.policy.{field}" if field else f"{where}.policy", problem)
                         for field, problem in exc.problems]
        anomaly = cluster.health.anomaly
        before = len(problems)
        _check(problems, f"{where}.health.anomaly.model_path", anomaly.model_path, _regular)
        if anomaly.model_path is not None and len(problems) == before:
            # Load it now so a bad file is a config error, named, before any traffic.
            from health.anomaly import AnomalyModel, AnomalyModelError

            try:
                anomaly_models[name] = AnomalyModel(anomaly.model_path)
            except AnomalyModelError as exc:
                problems.append((f"{where}.health.anomaly.model_path", str(exc)))
        _check(problems, f"{where}.health.anomaly.record_path", anomaly.record_path, _appendable)
        # Without verification the CA file is never read: nothing to hold against it.
        _check(problems, f"{where}.tls.ca_file",
               cluster.tls.ca_file if cluster.tls.verify else None, _ca_file)
    _check_files(problems, config)
    if problems:
        raise invalid_config(str(source), problems)
    return Loaded(config=config, source=Path(source), policy_options=options,
                  anomaly_models=anomaly_models)


def load(path: str | Path) -> Loaded:
    return validate(read_config(path), path)


def _check_files(problems: list[Problem], config: Config) -> None:
    tls = config.listen.tls
    if tls is not None:
        before = len(problems)
        _check(problems, "listen.tls.cert_file", tls.cert_file, _readable)
        _check(problems, "listen.tls.key_file", tls.key_file, _readable)
        if len(problems) == before:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                context.load_cert_chain(tls.cert_file, tls.key_file)
            except ssl.SSLError as exc:
                problems.append(("listen.tls", f"cannot load certificate {tls.cert_file} with key "
                                               f"{tls.key_file} (PEM, and the key must match it): {exc}"))
    if config.access_log.enabled and config.access_log.path != "-":
        _check(problems, "access_log.path", Path(config.access_log.path), _appendable)
    if config.telemetry.enabled:
        _check(problems, "telemetry.path", config.telemetry.path, _directory)
    forecast = config.forecast
    if forecast.enabled:
        from proxy.forecast import ForecastError, coefficients_for

        before = len(problems)
        _check(problems, "forecast.coefficients_path", forecast.coefficients_path, _regular)
        try:
            if len(problems) == before:
                coefficients_for(forecast)
        except ForecastError as exc:
            problems.append(("forecast.coefficients_path", str(exc)))
        _check(problems, "forecast.counts_path", forecast.counts_path, _appendable)


def _check(problems: list[Problem], field: str, path: Path | None,
           check: Callable[[Path], str | None]) -> None:
    problem = check(path) if path is not None else None
    if problem is not None:
        problems.append((field, problem))


def _not_regular(path: Path) -> bool:
    """A FIFO or device: opening one to check it could block (a FIFO without a reader or
    writer) or take data from whoever reads it."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def _regular(path: Path) -> str | None:
    """Not a FIFO or device (a missing file is the loader's own to report)."""
    return f"{path} is not a regular file" if _not_regular(path) else None


def _readable(path: Path) -> str | None:
    """Why a file the proxy reads whole (certificate, key, CA, model, coefficients) cannot
    be, or None: it must be a regular file (reading a FIFO could block for good)."""
    problem = _regular(path)
    if problem is not None:
        return problem
    try:
        with path.open("rb"):
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"


def _ca_file(path: Path) -> str | None:
    problem = _readable(path)
    if problem is None:
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            return f"no CA certificates in {path}: {exc}"
    return problem


def _appendable(path: Path) -> str | None:
    """Why a file to append to cannot be opened (or created) at `path`, or None. A FIFO or
    device is not opened here: only its permissions are checked."""
    if _not_regular(path):
        return None if os.access(path, os.W_OK) else f"cannot write {path}: permission denied"
    # os.path, not Path: Path.exists() raises on a directory it may not search (EACCES).
    if os.path.exists(path):
        try:
            with path.open("ab"):  # appending nothing changes nothing
                return None
        except OSError as exc:
            return f"cannot write {path}: {exc.strerror or exc}"
    if not os.path.isdir(path.parent):
        return f"cannot create {path}: no directory {path.parent}"
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            return None
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror or exc}"


def _directory(path: Path) -> str | None:
    """Why files cannot be written in directory `path` (created with its parents if missing), or None."""
    existing = path
    while not os.path.exists(existing):  # False, not an exception, where it may not look
        existing = existing.parent
    if not os.path.isdir(existing):
        return f"{existing} is not a directory"
    try:
        if existing == path:
            tempfile.TemporaryFile(dir=path).close()
        else:
            tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as exc:
        if existing == path:
            return f"cannot write in {path}: {exc.strerror or exc}"
        return f"cannot create {path} (in {existing}: {exc.strerror or exc})"
    return None
