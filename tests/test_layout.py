"""The package layout holds: every module imports on its own, and imports only run downward.

The rules are the table in ``shared/LAYOUT.md``: CLI and bench at the top, then store, llama and
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
LEAVES = ("rdmakv.errors", "rdmakv.hashing", "rdmakv.units", "rdmakv.kvstate", "rdmakv.bufpool", "rdmakv.url",
          "rdmakv.progress")  # fmt: skip
WIRE = ("rdmakv.wire", *LEAVES)
CLIENT = ("rdmakv.client", "rdmakv.calls", "rdmakv.wire", "fallback_tcp", "rdmakv.rdma", "slab", *LEAVES)

# (module prefix, what its modules may import); the first matching prefix wins.
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("rdmakv.errors", ()),
    ("rdmakv.hashing", ()),
    ("rdmakv.units", ()),
    ("rdmakv.url", ()),
    ("rdmakv.kvstate", ()),
    ("rdmakv.bufpool", ()),
    ("rdmakv.progress", ()),
    ("rdmakv.wire", WIRE),
    ("slab", ("slab",)),
    ("fallback_tcp", ("fallback_tcp", "rdmakv.wire", "rdmakv.errors")),
    ("rdmakv.rdma", ("rdmakv.rdma", "slab", *WIRE)),
    ("rdmakv.client", CLIENT),
    ("rdmakv.calls", CLIENT),
    # the store reports the package version in its handshake: "rdmakv" is the root __init__ only
    ("rdmakv.store", ("rdmakv.store", "rdmakv", *CLIENT)),
    ("rdmakv.llama", ("rdmakv.llama", *CLIENT)),
    ("rdmakv.cluster", ("rdmakv.cluster", *CLIENT)),
    ("rdmakv.guest", ("rdmakv.guest", "rdmakv.progress")),
    ("rdmakv.kvgen", LEAVES),
    ("rdmakv.lmcache", ("rdmakv.lmcache", "rdmakv.kvgen", *CLIENT)),
]
# the public API (root __init__), entry points and benchmarks may import anything below them
ANYTHING = ("rdmakv", "rdmakv.__main__", "rdmakv.cli", "rdmakv.demo", "rdmakv.doctor", "rdmakv.top",
            "rdmakv.serve_config", "bench")  # fmt: skip


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
            found.add(mod)
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            found.update(f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}"))
    return {m for m in found if m.split(".")[0] in TOP}


def _is_module(name: str) -> bool:
    p = ROOT.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _within(mod: str, prefixes: tuple[str, ...]) -> bool:
    # "rdmakv" in a rule means the root package only, never everything below it
    return any(mod == p or (p != "rdmakv" and mod.startswith(p + ".")) for p in prefixes)


def allowed(name: str) -> tuple[str, ...] | None:
    """What ``name`` may import; None = anything."""
    if name in ANYTHING or name.startswith("bench"):
        return None
    for prefix, allow in RULES:
        if name == prefix or name.startswith(prefix + "."):
            return allow
    raise AssertionError(f"{name} is in no layer of the layout table: add it to RULES (shared/LAYOUT.md)")


def test_imports_only_run_downward() -> None:
    bad = []
    for name, path in modules():
        allow = allowed(name)
        if allow is None:
            continue
        bad += [f"{name} imports {mod}" for mod in sorted(imported(name, path)) if not _within(mod, allow)]
    assert not bad, "imports against the layout (shared/LAYOUT.md):\n" + "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rule test above must be able to fail: an upward import in a wire module is caught."""
    fake = tmp_path / "messages.py"
    fake.write_text("from ..client import Store\nfrom . import manifest\n")
    found = imported("rdmakv.wire.messages", fake)
    assert "rdmakv.client" in found and "rdmakv.wire.manifest" in found
    assert not _within("rdmakv.client", allowed("rdmakv.wire.messages"))


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
