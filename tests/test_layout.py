"""The package layout holds: every module imports on its own, and imports only run downward.

The rules are the table in ``docs/layout.md``: CLI and bench at the top, then store, llama and
cluster, then the client, then rdma and fallback_tcp, then wire, then slab and the small leaf
modules. A cycle or an upward import fails here, not in a user's interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("rdmakv", "slab", "fallback_tcp", "bench")

# Modules that import nothing of the project above them: usable from every layer.
LEAVES = ("rdmakv.errors", "rdmakv.hashing", "rdmakv.units", "rdmakv.progress", "rdmakv.metrics_http",
          "rdmakv.client.reports", "rdmakv.client.bufpool", "rdmakv.client.url")  # fmt: skip
WIRE = ("rdmakv.wire", *LEAVES)
CLIENT = ("rdmakv.client", "rdmakv.wire", "fallback_tcp", "rdmakv.rdma", "slab", *LEAVES)

# (module prefix, what its modules may import); the first matching prefix wins.
RULES: list[tuple[str, tuple[str, ...]]] = [
    *((leaf, ()) for leaf in LEAVES),
    ("rdmakv.wire", WIRE),
    ("slab", ("slab",)),
    ("fallback_tcp", ("fallback_tcp", *WIRE)),
    # the restore's transport interface (and its TCP side) sits under both implementations
    ("rdmakv.client.transport", ("rdmakv.client.transport", "fallback_tcp", *WIRE)),
    ("rdmakv.rdma", ("rdmakv.rdma", "rdmakv.client.transport", "fallback_tcp", "slab", *WIRE)),
    ("rdmakv.client", CLIENT),
    # the engine knows nothing of sockets, servers or verbs: the server side drives it
    ("rdmakv.store.engine", ("rdmakv.store.engine", "rdmakv.store.logs", "slab", *WIRE)),
    # the store reports the package version in its handshake: "rdmakv" is the root __init__ only
    ("rdmakv.store", ("rdmakv.store", "rdmakv", *CLIENT)),
    ("rdmakv.llama", ("rdmakv.llama", *CLIENT)),
    ("rdmakv.cluster", ("rdmakv.cluster", *CLIENT)),
    ("rdmakv.guest", ("rdmakv.guest", "rdmakv.progress")),
    ("rdmakv.kvgen", LEAVES),
    ("rdmakv.lmcache", ("rdmakv.lmcache", "rdmakv.kvgen", *CLIENT)),
]
# the public API (root __init__), entry points and benchmarks may import anything below them
ANYTHING = ("rdmakv", "rdmakv.__main__", "bench")


def modules() -> list[tuple[str, Path]]:
    out = []
    for top in TOP:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), path))
    return out


def imported(name: str, path: Path) -> set[str]:
    """Every project module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one (and runs the
            # package's __init__, which counts only when something else is taken from it)
            subs = {f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    return {m for m in found if m.split(".")[0] in TOP}


def private_imports(name: str, path: Path) -> list[str]:
    """``_private`` names ``name`` takes from other project modules (a module's own underscore
    names are its business; importing them elsewhere couples two modules behind their backs)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        mod = _absolute(package, node)
        if mod.split(".")[0] in TOP:
            bad += [f"{name} imports {mod}.{a.name}" for a in node.names if a.name.startswith("_")
                    and not a.name.startswith("__") and not _is_module(f"{mod}.{a.name}")]  # fmt: skip
    return bad


def _absolute(package: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (strongly connected components of more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has ~300 nodes, so recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph() -> dict[str, set[str]]:
    """Who imports whom among the project's modules, type-only imports (under TYPE_CHECKING)
    and imports inside functions included: a cycle hidden there is still a cycle."""
    names = dict(modules())
    return {n: {m for m in imported(n, p) if m in names and m != n} for n, p in names.items()}


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _within(mod: str, prefixes: tuple[str, ...]) -> bool:
    # "rdmakv" in a rule means the root package only, never everything below it
    return any(mod == p or (p != "rdmakv" and mod.startswith(p + ".")) for p in prefixes)


def allowed(name: str) -> tuple[str, ...] | None:
    """What ``name`` may import; None = anything."""
    if name in ANYTHING or name.startswith(("bench.", "rdmakv.cli")):
        return None
    for prefix, allow in RULES:
        if name == prefix or name.startswith(prefix + "."):
            return allow
    raise AssertionError(f"{name} is in no layer of the layout table: add it to RULES (docs/layout.md)")


def test_imports_only_run_downward() -> None:
    bad = []
    for name, path in modules():
        allow = allowed(name)
        if allow is None:
            continue
        bad += [f"{name} imports {mod}" for mod in sorted(imported(name, path)) if not _within(mod, allow)]
    assert not bad, "imports against the layout (docs/layout.md):\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule test above must be able to fail: an upward import in a wire module is caught."""
    fake = tmp_path / "messages.py"
    fake.write_text("from ..client.store import Store\nfrom . import manifest\n")
    found = imported("rdmakv.wire.messages", fake)
    assert "rdmakv.client.store" in found and "rdmakv.wire.manifest" in found
    assert not _within("rdmakv.client.store", allowed("rdmakv.wire.messages"))


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [line for name, path in modules() for line in private_imports(name, path)]
    assert not bad, "imports of another module's _private names:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (type-only imports included):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checkers_see_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    fake = tmp_path / "x.py"
    fake.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .codec import _U8, Reader\n")
    assert private_imports("rdmakv.wire.x", fake) == ["rdmakv.wire.x imports rdmakv.wire.codec._U8"]
    assert "rdmakv.wire.codec" in imported("rdmakv.wire.x", fake)  # type-only imports count


def test_every_module_is_in_the_architecture_doc() -> None:
    """docs/architecture.md is where a newcomer finds a module's role: each one has a line there."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for _, path in modules():
        rel = str(path.relative_to(ROOT))
        short = rel.removesuffix(".py")
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel not in doc and f"`{path.name}`" not in doc and f"`{path.stem}`" not in doc and short not in doc:
            missing.append(rel)
    assert not missing, "modules docs/architecture.md does not mention:\n" + "\n".join(missing)


# modules of an optional extra: they import alone where the extra is installed (the LMCache
# suite runs this test in its own venv), and are skipped elsewhere
EXTRAS = {"rdmakv.lmcache.connector": "lmcache", "rdmakv.lmcache.cpu_engine": "lmcache",
          "bench.lmcache_backends": "lmcache"}


@pytest.mark.parametrize("name", [n for n, _ in modules() if not n.endswith("__main__")])
def test_imports_alone_in_a_fresh_interpreter(name: str) -> None:
    import importlib.util

    extra = EXTRAS.get(name)
    if extra is not None and importlib.util.find_spec(extra) is None:
        pytest.skip(f"{name} needs the optional {extra!r} (rdmakv[{extra}])")
    r = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, f"`python -c 'import {name}'` failed:\n{r.stderr[-3000:]}"


def test_public_names_stay_where_users_have_them() -> None:
    code = (
        "import rdmakv\n"
        "from rdmakv import connect, Store, KVState, SaveReport, RestoreReport\n"
        "from rdmakv import RdmakvError, AuthError, NotFoundError, StoreFullError, IntegrityError, "
        "MissingChunksError\n"
        "assert rdmakv.connect is connect and callable(connect)\n"
        "assert set(rdmakv.__all__) <= set(dir(rdmakv)) | {'Store', 'connect'}\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_no_module_over_the_size_limit() -> None:
    limit = 520  # "no more than about 500 lines"
    paths = [p for top in (*TOP, "tests") for p in (ROOT / top).rglob("*.py")]
    big = {str(p.relative_to(ROOT)): n for p in paths if (n := len(p.read_text().splitlines())) > limit}
    assert not big, f"modules over {limit} lines: {big}"
