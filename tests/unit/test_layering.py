"""Who may import whom (DESIGN.md §1), checked by parsing every module's imports.

Every `import` statement counts, including ones inside functions and under
`if TYPE_CHECKING:`: a lazy or type-only import is still a dependency.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUR_PACKAGES = ("proxy", "policies", "health", "train", "bench")
CHECKED_PACKAGES = ("proxy", "policies", "health", "train")

# The shared vocabulary: backend identity and state, config models, the
# policy and detector protocols, the feature schema.
VOCABULARY = frozenset({
    "proxy.state",
    "proxy.config",
    "health.config",
    "health.base",
    "policies.base",
    "policies.features",
})

# Packages that run inside the proxy process, on or beside the request path.
REQUEST_PATH = ("proxy", "policies", "health")
# Training-only libraries that must never load in the proxy process.
TRAINING_ONLY = ("sklearn", "skl2onnx")

# The server: what train must never pull in, directly or through anything else.
SERVER = frozenset({"proxy.server", "proxy.worker", "proxy.runtime", "proxy.main"})


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in OUR_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def parse_imports(source: str, module: str, is_package: bool = False) -> frozenset[str]:
    """Absolute names of everything `source` (the text of `module`) imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            for alias in node.names:
                # `from proxy import state` imports the module proxy.state.
                if f"{base}.{alias.name}" in modules():
                    names.add(f"{base}.{alias.name}")
    return frozenset(names)


@cache
def imports(module: str) -> frozenset[str]:
    path = modules()[module]
    return parse_imports(path.read_text(), module, path.name == "__init__.py")


def ours(name: str) -> bool:
    return name.split(".")[0] in OUR_PACKAGES


def package_of(module: str) -> str:
    return module.split(".")[0]


def closure(module: str) -> set[str]:
    """Our modules reachable from `module` through imports."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in imports(todo.pop()):
            if name in modules() and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def checked(*packages: str) -> list[str]:
    return [m for m in modules() if package_of(m) in packages]


def test_the_tree_is_found() -> None:
    assert {"proxy.state", "policies.base", "policies.p2c", "health.config"} <= set(modules())


@pytest.mark.parametrize("module", sorted(VOCABULARY))
def test_vocabulary_imports_only_vocabulary(module: str) -> None:
    if module not in modules():
        pytest.skip(f"{module} does not exist")
    bad = {n for n in imports(module) if ours(n) and n not in VOCABULARY
           and n not in OUR_PACKAGES}
    assert not bad, f"{module} is vocabulary but imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["policies", "health"])
def test_policies_and_health_import_only_vocabulary_and_themselves(package: str) -> None:
    problems = {}
    for module in checked(package):
        # `from proxy import state` also records the package `proxy` itself; the
        # module it names is what counts.
        bad = {n for n in imports(module) if ours(n) and package_of(n) != package
               and n not in VOCABULARY and n not in OUR_PACKAGES}
        if bad:
            problems[module] = sorted(bad)
    assert not problems, f"{package} reaches past the vocabulary: {problems}"


def test_nothing_on_the_request_path_imports_training_libraries() -> None:
    problems = {}
    for module in checked(*REQUEST_PATH):
        bad = {n for n in imports(module) if n.split(".")[0] in TRAINING_ONLY}
        if bad:
            problems[module] = sorted(bad)
    assert not problems, f"scikit-learn on the request path: {problems}"


def test_train_never_reaches_the_server() -> None:
    problems = {}
    for module in checked("train"):
        bad = closure(module) & SERVER
        if bad:
            problems[module] = sorted(bad)
    assert not problems, f"train imports the server (directly or not): {problems}"


def test_the_feature_schema_lives_only_in_policies_features() -> None:
    # train and the learned policy both import it; nobody else in policies or
    # train defines feature names or a schema version of the latency model.
    owners = []
    for module in checked("policies", "train"):
        tree = ast.parse(modules()[module].read_text())
        for node in tree.body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id in ("FEATURE_NAMES", "SCHEMA_VERSION")
                   for t in targets):
                owners.append(module)
    assert set(owners) <= {"policies.features"}, owners


def test_the_parser_sees_every_form_of_import() -> None:
    # The rules above are only worth something if a bad import is seen.
    source = (
        "import sklearn.ensemble\n"
        "from proxy import server\n"
        "from . import p2c\n"
        "from .base import RequestInfo\n"
        "def lazy() -> None:\n"
        "    from skl2onnx import to_onnx\n"
        "if TYPE_CHECKING:\n"
        "    from health.checker import HealthChecker\n"
    )
    found = parse_imports(source, "policies.example")
    assert {"sklearn.ensemble", "proxy.server", "policies.p2c", "policies.base", "skl2onnx",
            "health.checker"} <= found
    assert {n for n in found if n.split(".")[0] in TRAINING_ONLY} == {"sklearn.ensemble", "skl2onnx"}
    assert {n for n in found if ours(n) and package_of(n) != "policies"
            and n not in VOCABULARY and n not in OUR_PACKAGES} == {"proxy.server", "health.checker"}
