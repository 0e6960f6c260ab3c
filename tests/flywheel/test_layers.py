"""The import graph keeps its layers: base <- stages <- orchestrator, and no cycles.

Every ``import`` of every module counts, including imports inside functions (the ones a
lazy import hides from a glance at the file's head).  The layers, as ``docs/architecture.md``
draws them:

* base - ``flywheel.base`` (wire contract, config, errors, MQTT, broker, Ray start-up,
  windowing and featurisers, live view, workdir, generic MLflow helpers): imports nothing
  of ours above it;
* stages - ``factory_sim``, ``ingest``, ``finetune``, ``serve``, ``gateway``: import the base, and only
  the stage edges listed in ``STAGE_EDGES`` (serving loads models the way training saved them);
* orchestrator - every other ``flywheel.*`` module (loop, campaign, report, CLI): imports the
  base and the stages, the stages only through their package facades (``from ingest import
  build_snapshot``, not ``from ingest.dataset import ...``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("factory_sim", "ingest", "finetune", "serve", "gateway")
#: Allowed imports between stages (importer -> imported).
STAGE_EDGES = {("serve", "finetune")}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in STAGES:
        return top
    if module == "flywheel" or module.startswith("flywheel.base"):
        return "base"
    return "orchestrator"


def imports() -> list[tuple[str, str, int, str]]:
    """(importing module, imported module, line, file) for every import of our packages."""
    ours = ("flywheel",) + STAGES
    out = []
    for top in ours:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [(a.name, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    # ``from flywheel.base import contract`` imports flywheel.base.contract
                    names = [(node.module, node.lineno)]
                    names += [(f"{node.module}.{a.name}", node.lineno) for a in node.names
                              if (ROOT / Path(*node.module.split("."), a.name + ".py")).exists()]
                else:
                    continue
                for name, line in names:
                    if name.split(".")[0] in ours:
                        out.append((module, name, line, str(path.relative_to(ROOT))))
    return out


def test_the_base_layer_exists_and_is_where_the_contract_lives():
    assert (ROOT / "flywheel" / "base" / "contract.py").exists()
    assert not (ROOT / "flywheel" / "contract.py").exists()


def test_no_import_runs_back_up_a_layer():
    rank = {"base": 0, "factory_sim": 1, "ingest": 1, "finetune": 1, "serve": 1, "gateway": 1, "orchestrator": 2}
    bad = []
    for src, dst, line, path in imports():
        a, b = layer(src), layer(dst)
        if a == b:
            continue
        if rank[b] > rank[a] or (rank[a] == rank[b] == 1 and (a, b) not in STAGE_EDGES):
            bad.append(f"{path}:{line} {src} ({a}) imports {dst} ({b})")
    assert not bad, "imports that run back up a layer or across stages:\n" + "\n".join(bad)


def test_the_orchestrator_uses_the_stages_facades():
    bad = [f"{path}:{line} {src} imports {dst}; import it from the package facade ({dst.split('.')[0]})"
           for src, dst, line, path in imports()
           if layer(src) == "orchestrator" and layer(dst) in STAGES and dst not in STAGES]
    assert not bad, "\n".join(bad)


def test_no_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    for src, dst, _line, _path in imports():
        a, b = layer(src), layer(dst)
        if a != b:
            edges.setdefault(a, set()).add(b)
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(edges):
        visit(node)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    # The guard must not be blind to a lazy import: the loop's imports of the stages live in
    # functions today, and one of them must show up here.
    lazy = [(src, dst) for src, dst, _l, _p in imports() if src == "flywheel.loop" and layer(dst) in STAGES]
    assert lazy, "flywheel.loop imports no stage? the checker lost imports"
