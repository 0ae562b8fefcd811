"""Policies by name: `kind: p2c_peak_ewma` loads policies/p2c_peak_ewma.py.

A policy module's name is its registry key. A dotted path
(`mypkg.mymodule.MyPolicy` or `mypkg.mymodule:MyPolicy`) loads a user's own
class, which must follow the same shape: a `name`, an `Options` model, and a
constructor `(options, ctx)`. An option marked `NestedPolicy` names a policy
built inside this one (explore's `base`, onnx_latency's `fallback`); it is
validated here with the outer one. A class with `learned = True` routes by a
model: a nested policy marked `heuristic` must be neither one nor wrap one.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

from pydantic import ValidationError

from policies.base import NestedPolicy, Policy, PolicyContext, PolicyFactory, PolicyOptions

_BUILTIN_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_DOTTED_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*[.:][A-Za-z_]\w*$")


# (dotted path of an option within the policy's spec, what is wrong with it)
Problem = tuple[str, str]


class PolicyError(Exception):
    """A policy that cannot be built. `problems` name each bad option by its
    dotted path within the policy's spec (`kind`, `base`, `base_options.epsilon`)."""

    def __init__(self, message: str = "", problems: Sequence[Problem] = ()) -> None:
        self.problems = list(problems) or [("", message)]
        super().__init__(message or "; ".join(f"{f}: {m}" if f else m for f, m in self.problems))


def resolve(kind: str) -> PolicyFactory:
    """The policy class for `kind`, or PolicyError saying why not."""
    if _BUILTIN_RE.match(kind):
        module_name, attr = f"policies.{kind}", None
    elif _DOTTED_RE.match(kind):
        module_name, _, attr = kind.replace(":", ".").rpartition(".")
    else:
        raise PolicyError(f"{kind!r} is not a built-in policy name nor a dotted path "
                          "(mypkg.mymodule.MyPolicy)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if attr is None and exc.name == module_name:
            known = ", ".join(builtin_kinds())
            raise PolicyError(f"no such policy {kind!r} (known: {known})") from None
        raise PolicyError(f"policy {kind!r}: cannot import {module_name}: {exc}") from None
    except Exception as exc:  # a user's module that fails as it is imported
        raise PolicyError(f"policy {kind!r}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    if attr is None:
        found = [v for v in vars(module).values()
                 if isinstance(v, type) and getattr(v, "name", None) == kind and hasattr(v, "Options")]
        if not found:
            raise PolicyError(f"policy {kind!r}: module {module_name} defines no policy named {kind!r}")
        return cast(PolicyFactory, found[0])
    cls = getattr(module, attr, None)
    if cls is None or not hasattr(cls, "Options") or not hasattr(cls, "pick"):
        raise PolicyError(f"policy {kind!r}: {attr} in {module_name} is not a policy class "
                          "(needs name, Options and pick)")
    return cast(PolicyFactory, cls)


def validate_options(kind: str, options: Mapping[str, Any]) -> Any:
    """Validate `options` with the policy's own model, and each policy they name with
    its own (recursively); PolicyError names every bad option."""
    validated, _, problems = _check(kind, options, "kind", "")
    if problems:
        raise PolicyError(problems=problems)
    return validated


def _check(kind: str, options: Mapping[str, Any], kind_field: str, prefix: str
           ) -> tuple[Any, bool, list[Problem]]:
    """(validated options, whether the policy is or wraps a learned one, problems).
    `kind_field` is where `kind` was given; option paths start with `prefix`."""
    try:
        factory = resolve(kind)
    except PolicyError as exc:
        return None, False, [(kind_field, str(exc))]
    try:
        validated = factory.Options.model_validate(dict(options))
    except ValidationError as exc:
        return None, False, [(_path(prefix, e["loc"]), e["msg"].removeprefix("Value error, "))
                             for e in exc.errors()]
    learned = bool(getattr(factory, "learned", False))
    problems: list[Problem] = []
    for name, nested in _nested(factory.Options):
        inner_kind = getattr(validated, name)
        _, inner_learned, inner_problems = _check(
            inner_kind, getattr(validated, nested.options_field), prefix + name,
            f"{prefix}{nested.options_field}.")
        problems += inner_problems
        if nested.heuristic and inner_learned:
            problems.append((prefix + name, f"must be a heuristic; {inner_kind!r} is a learned policy "
                                            "or wraps one"))
        elif inner_kind == kind:
            problems.append((prefix + name, f"must be another policy than {kind!r}"))
        learned = learned or inner_learned
    return validated, learned, problems


def _nested(options_model: type[PolicyOptions]) -> list[tuple[str, NestedPolicy]]:
    return [(name, meta) for name, field in options_model.model_fields.items()
            for meta in field.metadata if isinstance(meta, NestedPolicy)]


def _path(prefix: str, loc: Sequence[int | str]) -> str:
    return prefix + ".".join(str(p) for p in loc) if loc else prefix.rstrip(".")


def create(kind: str, options: Mapping[str, Any], ctx: PolicyContext) -> Policy:
    factory = resolve(kind)
    return factory(validate_options(kind, options), ctx)


def builtin_kinds() -> list[str]:
    from importlib import resources

    names = []
    for entry in resources.files("policies").iterdir():
        stem = entry.name.removesuffix(".py")
        if entry.name.endswith(".py") and stem not in ("__init__", "base", "registry", "features", "p2c"):
            names.append(stem)
    return sorted(names)
