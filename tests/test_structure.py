"""The package's shape, as the code review of issue 32 asked for it: every kernel module takes what it
shares from the internal modules (``_common``, ``_validate``, ``_autograd``), not from another kernel
module's private names; there are no import cycles; tests steer the kernels' choices through the
documented planning seam, not by patching private names."""

from __future__ import annotations

import ast
import pathlib

import pytest

import minikernels
from minikernels import planning

PACKAGE = pathlib.Path(minikernels.__file__).parent
TESTS = pathlib.Path(__file__).parent


def modules() -> dict[str, ast.Module]:
    """{dotted name: parsed source} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (ast.parse(path.read_text()), path.name == "__init__.py")
    return out


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def package_imports(top_level_only: bool):
    """(importer, imported module, names) for every `from ... import` of a package module."""
    mods = modules()
    for name, (tree, is_package) in mods.items():
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, is_package, node)
                if target.split(".")[0] != "minikernels":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    yield name, (sub if sub in mods else target), alias.name


def test_no_module_imports_another_modules_private_names():
    offenders = []
    mods = modules()
    for importer, target, imported in package_imports(top_level_only=False):
        is_module = f"{target}" in mods and target.endswith("." + imported)
        if imported.startswith("_") and not is_module and importer != target:
            offenders.append(f"{importer} imports {imported} from {target}")
    assert not offenders, offenders


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for importer, target, _ in package_imports(top_level_only=True):
        if target != importer and not importer.startswith(target + "."):  # a package's submodule, from it
            graph.setdefault(importer, set()).add(target)

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles[:3]


def test_tests_patch_no_private_names_of_the_package():
    """Tests steer tiles and variants through minikernels.planning; monkeypatch is left for the
    environment (setenv / delenv)."""
    offenders = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("setattr", "setitem", "delattr", "delitem")
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "monkeypatch"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


def test_every_planning_choice_is_asked_for_somewhere():
    """Each name in planning.CHOICES is decided by some kernel module (a documented choice that nothing
    asks for would be an override that silently does nothing)."""
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "planning.py")
    unused = [name for name in planning.CHOICES if f'"{name}"' not in sources
              and f'f"{name.split(".")[0]}.{{' not in sources]
    assert not unused, unused


def test_override_rejects_unknown_names_and_restores():
    with pytest.raises(KeyError, match="unknown planning choices"):
        with planning.override({"linear.segmnets": 2}):
            pass
    with planning.override({"linear.segments": 2}):
        assert planning.decide("linear.segments", lambda *a: 1, 0, 0, 0) == 2
        with planning.override({"linear.segments": lambda p, n, s: p + n + s}):
            assert planning.decide("linear.segments", lambda *a: 1, 1, 2, 3) == 6
        assert planning.decide("linear.segments", lambda *a: 1, 0, 0, 0) == 2
    assert planning.decide("linear.segments", lambda *a: 1, 0, 0, 0) == 1
