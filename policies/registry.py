"""Policies by name: `kind: p2c_peak_ewma` loads policies/p2c_peak_ewma.py.

A policy module's name is its registry key. A dotted path
(`mypkg.mymodule.MyPolicy` or `mypkg.mymodule:MyPolicy`) loads a user's own
class, which must follow the same shape: a `name`, an `Options` model, and a
constructor `(options, ctx)`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import Any, cast

from pydantic import ValidationError

from policies.base import Policy, PolicyContext, PolicyFactory

_BUILTIN_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class PolicyError(Exception):
    """A policy that cannot be built; the message names the option and the problem."""


def resolve(kind: str) -> PolicyFactory:
    """The policy class for `kind`, or PolicyError saying why not."""
    if _BUILTIN_RE.match(kind):
        module_name, attr = f"policies.{kind}", None
    else:
        module_name, _, attr = kind.replace(":", ".").rpartition(".")
        if not module_name:
            raise PolicyError(f"kind {kind!r}: not a built-in policy name nor a dotted path")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if attr is None and exc.name == module_name:
            known = ", ".join(builtin_kinds())
            raise PolicyError(f"kind {kind!r}: no such policy (known: {known})") from None
        raise PolicyError(f"kind {kind!r}: cannot import {module_name}: {exc}") from None
    if attr is None:
        found = [v for v in vars(module).values()
                 if isinstance(v, type) and getattr(v, "name", None) == kind and hasattr(v, "Options")]
        if not found:
            raise PolicyError(f"kind {kind!r}: module {module_name} defines no policy named {kind!r}")
        return cast(PolicyFactory, found[0])
    cls = getattr(module, attr, None)
    if cls is None or not hasattr(cls, "Options") or not hasattr(cls, "pick"):
        raise PolicyError(f"kind {kind!r}: {attr} in {module_name} is not a policy class "
                          "(needs name, Options and pick)")
    return cast(PolicyFactory, cls)


def validate_options(kind: str, options: Mapping[str, Any]) -> Any:
    """Validate `options` with the policy's own model; PolicyError names the bad option."""
    factory = resolve(kind)
    try:
        return factory.Options.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors())
        raise PolicyError(f"policy {kind!r}: {problems}") from None


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
