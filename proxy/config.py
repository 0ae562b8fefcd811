"""Typed, frozen models for config.yaml.

Every model rejects unknown keys, so a typo is an error that names the field
rather than a setting silently ignored. Validation happens once, at start-up
and on reload; the request path trusts the result.

This module imports only other leaf modules of ours (health.config).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from health.config import HealthConfig, UrlPath

DEFAULT_CLUSTER = "default"
RetryOn = Literal["connect-failure", "reset", "timeout", "5xx", "gateway-error"]
_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]+$")
# An HTTP token (RFC 9110 section 5.6.2): what a method or a header name is made of.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class ConfigError(Exception):
    """A config file that cannot be used; the message names file, field and problem."""


# A host name as DNS allows it (RFC 1123 labels; '_' too, as resolvers accept it).
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
                          r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _check_host(host: str) -> str:
    """An IP address or a host name, by its spelling alone: it is resolved when bound."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"{host!r} is not an IP address or a host name "
                             "(0.0.0.0 or :: for every interface)") from None
    return host


# Where the proxy listens: an IP address or a name (not looked up before it is bound).
Host = Annotated[str, AfterValidator(_check_host)]


class Frozen(BaseModel):
    # Numbers are StrictInt/StrictFloat (YAML `true` is not 1) and finite (`.inf` is no timeout).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ListenTls(Frozen):
    cert_file: Path
    key_file: Path


class Listen(Frozen):
    host: Host = "127.0.0.1"
    port: StrictInt = Field(8080, ge=0, le=65535)
    tls: ListenTls | None = None
    # Kernel accept queue length.
    backlog: StrictInt = Field(1024, ge=1)


class Admin(Frozen):
    host: Host = "127.0.0.1"
    port: StrictInt = Field(9901, ge=0, le=65535)


class BackendSpec(Frozen):
    url: str
    id: str = ""
    weight: StrictInt = Field(1, ge=1, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _from_url_string(cls, data: Any) -> Any:
        return {"url": data} if isinstance(data, str) else data

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, got {url!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"must not carry a path or query, got {url!r}")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"bad port in {url!r}") from exc
        _check_host(parts.hostname)
        return url.rstrip("/")

    @model_validator(mode="after")
    def _default_id(self) -> BackendSpec:
        if not self.id:
            parts = urlsplit(self.url)
            object.__setattr__(self, "id", f"{parts.hostname}:{parts.port or _default_port(parts.scheme)}")
        elif not _ID_RE.match(self.id):
            raise ValueError(f"id {self.id!r} may only hold letters, digits and _.:-")
        return self


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


class PolicySpec(Frozen):
    """`kind` names a registered policy (or a dotted path to a user's class).

    Any other key is an option of that policy, validated by the policy itself
    when the config is loaded (see proxy.loader).
    """

    kind: str = "p2c_peak_ewma"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data}
        if isinstance(data, dict):
            data = dict(data)
            options = dict(data.pop("options", None) or {})
            kind = data.pop("kind", "p2c_peak_ewma")
            options.update(data)
            return {"kind": kind, "options": options}
        return data


class UpstreamTls(Frozen):
    verify: bool = True
    ca_file: Path | None = None


class ClusterSpec(Frozen):
    backends: list[BackendSpec] = Field(min_length=1)
    policy: PolicySpec = PolicySpec()
    health: HealthConfig = HealthConfig()
    tls: UpstreamTls = UpstreamTls()
    # Time constant of the peak-EWMA latency estimate.
    ewma_decay_s: StrictFloat = Field(10.0, gt=0)
    # When every backend is ejected: route to all of them anyway (true) or answer 503.
    panic_routing: bool = True

    @field_validator("backends")
    @classmethod
    def _unique_ids(cls, backends: list[BackendSpec]) -> list[BackendSpec]:
        seen: set[str] = set()
        for b in backends:
            if b.id in seen:
                raise ValueError(f"backend id {b.id!r} appears twice; give each an explicit id")
            seen.add(b.id)
        return backends


class Route(Frozen):
    """First matching route wins. Empty matchers match everything."""

    cluster: str = DEFAULT_CLUSTER
    # The route class: a bounded label used in metrics and model features.
    name: str = ""
    host: str | None = None
    path_prefix: UrlPath = "/"
    methods: list[str] | None = None
    # Header name -> exact value, or "*" for "present with any value".
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("methods")
    @classmethod
    def _upper(cls, methods: list[str] | None) -> list[str] | None:
        for method in methods or ():
            if not _TOKEN_RE.match(method):
                raise ValueError(f"{method!r} is not an HTTP method (letters, digits and !#$%&'*+-.^_`|~)")
        return [m.upper() for m in methods] if methods else None

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            if not _TOKEN_RE.match(name):
                raise ValueError(f"{name!r} is not a header name (letters, digits and !#$%&'*+-.^_`|~)")
        return headers

    @model_validator(mode="after")
    def _default_name(self) -> Route:
        if not self.name:
            object.__setattr__(self, "name", self.path_prefix.strip("/").split("/")[0] or "root")
        return self


class Timeouts(Frozen):
    connect_s: StrictFloat = Field(1.0, gt=0)
    per_try_s: StrictFloat = Field(15.0, gt=0)
    # All tries together, counted from the moment the request is complete (as Envoy's
    # route timeout): a slow upload is bounded by client_body_idle_s, not by this.
    total_s: StrictFloat = Field(30.0, gt=0)
    # Time a client has to send complete request headers (slowloris guard).
    client_header_s: StrictFloat = Field(10.0, gt=0)
    client_idle_s: StrictFloat = Field(75.0, gt=0)
    # A request body that sends nothing for this long is abandoned (400).
    client_body_idle_s: StrictFloat = Field(30.0, gt=0)
    # On SIGTERM, how long in-flight requests may finish before the exit.
    drain_s: StrictFloat = Field(15.0, ge=0)


class RetryBudget(Frozen):
    """Concurrent retries allowed: `percent` of active requests, never below `min_concurrent`."""

    percent: StrictFloat = Field(20.0, ge=0, le=100)
    min_concurrent: StrictInt = Field(10, ge=0)


class Retries(Frozen):
    # Total tries per request, the first included.
    attempts: StrictInt = Field(3, ge=1, le=10)
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: ["connect-failure", "reset", "timeout", "gateway-error"]  # type: ignore[arg-type]
    )
    budget: RetryBudget = RetryBudget()


class Limits(Frozen):
    # All request header lines together (431 above this).
    max_header_bytes: StrictInt = Field(32 * 1024, ge=1024)
    max_header_count: StrictInt = Field(100, ge=1)
    # Request body (413 above this); None means unlimited.
    max_body_bytes: StrictInt | None = Field(4 * 1024**3, ge=0)


class AccessLog(Frozen):
    enabled: bool = False
    # "-" is standard output.
    path: str = "-"
    sample_rate: StrictFloat = Field(1.0, ge=0, le=1)


class Telemetry(Frozen):
    """Decision-time features and outcomes, sampled, for offline training."""

    enabled: bool = False
    path: Path = Path("telemetry")
    sample_rate: StrictFloat = Field(0.1, ge=0, le=1)
    max_file_bytes: StrictInt = Field(64 * 1024**2, ge=1024)
    max_total_bytes: StrictInt = Field(1024**3, ge=1024)
    # How often the writer thread writes what is queued.
    flush_interval_s: StrictFloat = Field(0.5, gt=0)
    # Records waiting for the writer beyond this are dropped (and counted).
    max_pending_rows: StrictInt = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _file_fits_the_budget(self) -> Telemetry:
        # Else every file is over the budget alone and deleted whole when it closes.
        if self.max_file_bytes > self.max_total_bytes:
            raise ValueError(f"max_file_bytes ({self.max_file_bytes}) must not exceed "
                             f"max_total_bytes ({self.max_total_bytes})")
        return self


class Forecast(Frozen):
    """Next-interval load forecast, Load(t) = a + b*R(t-1) + c*R(t-2), as Prometheus gauges."""

    enabled: bool = False
    # JSON written by `foretell train forecast`; without it the forecast is
    # the last interval's count (a=0, b=1, c=0).
    coefficients_path: Path | None = None
    interval_s: StrictFloat = Field(10.0, gt=0)
    # Requests per second one replica serves at its target utilisation.
    capacity_rps_per_replica: StrictFloat = Field(100.0, gt=0)
    min_replicas: StrictInt = Field(1, ge=0)
    max_replicas: StrictInt = Field(1000, ge=1)
    # Append "interval_end_s,requests" per interval here (training data for
    # `foretell train forecast --counts`).
    counts_path: Path | None = None

    @model_validator(mode="after")
    def _replica_range(self) -> Forecast:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas "
                             f"({self.max_replicas})")
        return self


class Config(Frozen):
    listen: Listen = Listen()
    admin: Admin = Admin()
    workers: StrictInt = Field(1, ge=1, le=64)
    clusters: dict[str, ClusterSpec] = Field(default_factory=dict)
    routes: list[Route] = Field(default_factory=list)
    timeouts: Timeouts = Timeouts()
    retries: Retries = Retries()
    limits: Limits = Limits()
    access_log: AccessLog = AccessLog()
    telemetry: Telemetry = Telemetry()
    forecast: Forecast = Forecast()

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """Top-level `backends`/`policy`/`health` make one cluster named `default`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        short = {k: data.pop(k) for k in ("backends", "policy", "health") if k in data}
        if short:
            if "backends" not in short:
                raise ValueError("top-level 'policy'/'health' need top-level 'backends' too")
            if data.get("clusters"):
                raise ValueError("use either top-level 'backends' or 'clusters', not both")
            data["clusters"] = {DEFAULT_CLUSTER: short}
        return data

    @model_validator(mode="after")
    def _routes_name_clusters(self) -> Config:
        if not self.clusters:
            raise ValueError("no backends: give 'backends' (one cluster) or 'clusters'")
        if not self.routes:
            if len(self.clusters) != 1:
                raise ValueError("with several clusters, 'routes' must say which requests go where")
            only = next(iter(self.clusters))
            object.__setattr__(self, "routes", [Route(cluster=only, name="default")])
        for i, route in enumerate(self.routes):
            if route.cluster not in self.clusters:
                raise ValueError(
                    f"routes.{i}.cluster: unknown cluster {route.cluster!r} "
                    f"(known: {', '.join(sorted(self.clusters))})")
        if self.timeouts.per_try_s > self.timeouts.total_s:
            raise ValueError("timeouts.per_try_s must not exceed timeouts.total_s")
        if _same_socket(self.listen, self.admin):
            raise ValueError(f"admin.port: {self.admin.host}:{self.admin.port} is taken by listen "
                             f"({self.listen.host}:{self.listen.port}); give admin another port")
        return self

    def route_classes(self) -> list[str]:
        """Bounded list of route class names, in route order, without repeats."""
        return list(dict.fromkeys(r.name for r in self.routes))


def _same_socket(a: Listen | Admin, b: Listen | Admin) -> bool:
    """Whether binding both would collide: one port (not 0, which picks a free one), and
    one host or a wildcard of the other's family. Names are not resolved."""
    if a.port != b.port or a.port == 0:
        return False
    if a.host == b.host:
        return True
    try:
        ip_a, ip_b = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    except ValueError:
        return False
    return ip_a.version == ip_b.version and (ip_a.is_unspecified or ip_b.is_unspecified)


def invalid_config(source: str, problems: Sequence[tuple[str, str]]) -> ConfigError:
    """One error listing every bad field by its dotted path, and what is wrong with it."""
    lines = [f"{source}: invalid config ({len(problems)} error(s))"]
    # A problem of the whole config names its fields itself.
    lines += [f"  {field}: {problem}" if field else f"  {problem}" for field, problem in problems]
    return ConfigError("\n".join(lines))


def parse_config(data: Any, source: str = "<config>") -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [(".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()]
        raise invalid_config(source, problems) from None


# Deeper than any real config (policy options nested in policy options included);
# without a limit PyYAML's recursive composer ends in RecursionError.
MAX_NESTING = 100


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the
    last, silently) and mappings or lists nested deeper than MAX_NESTING."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_NESTING} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node: yaml.MappingNode = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            # A `<<: *anchor` merge is not a key; the keys it brings may be overridden here.
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            seen = first.setdefault((key.tag, key.value), key)
            if seen is not key:
                raise yaml.composer.ComposerError(
                    "first", seen.start_mark, f"duplicate key {key.value!r}", key.start_mark)
        return node


def _where(text: str, position: int) -> str:
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return f"line {line}, column {column}"


def _at(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What PyYAML found and where, in one line (without its source excerpts)."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return str(exc)
    text = f"{_at(exc.problem_mark)}: {exc.problem}"
    if exc.context and exc.context_mark is not None:
        text += f" ({exc.context} at {_at(exc.context_mark)})"
    return text


def load_yaml(path: Path) -> Any:
    """The YAML document in `path`; ConfigError naming the file, and the line when there is one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[:exc.start].decode("utf-8")  # valid up to the bad byte
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at "
                          f"{_where(before, len(before))} ({exc.reason})") from None
    try:
        loader = _ConfigLoader(text)
    except yaml.reader.ReaderError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_where(text, exc.position)}: character "
                          f"#x{exc.character:04x} is not allowed") from None
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except ValueError as exc:
        # SafeLoader's constructors: `!!int x`, a timestamp such as 2020-13-45.
        raise ConfigError(f"{path}: not valid YAML: a value cannot be read: {exc}") from None
    finally:
        loader.dispose()


def read_config(path: str | Path) -> Config:
    """Read and validate one YAML file; every failure is a ConfigError naming the file."""
    path = Path(path)
    return parse_config(load_yaml(path), str(path))
