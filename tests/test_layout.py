"""The package's architecture, checked from its import graph: no import cycle (function-level
imports included, since a lazy import that would cycle is a cycle hidden), and the layers
core -> training -> apps (toy2d, images) -> cli, with neither app on top of the other."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "pyflowmap"
APPS = ("pyflowmap.toy2d", "pyflowmap.images")
TOP = ("pyflowmap.cli", "pyflowmap.__main__")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}
EXTENSIONS = {"pyflowmap._C"}  # compiled: imports nothing of the package


def _resolve(name: str) -> str | None:
    """The pyflowmap module an import of ``name`` executes (a name inside a module: the module)."""
    if name in EXTENSIONS:
        return name
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` imports the submodule when there is one, else pkg itself
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] == "pyflowmap":
                target = _resolve(n)
                if target is not None and target != module:
                    out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}
GRAPH.update({e: set() for e in EXTENSIONS})


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_package():
    assert {"pyflowmap.flowmap", "pyflowmap.training.loop", "pyflowmap.toy2d.train", "pyflowmap.images.train",
            "pyflowmap.ops.losses", "pyflowmap.reference.dual"} <= set(GRAPH)
    assert "pyflowmap.training.checkpoint" in GRAPH["pyflowmap.training.loop"]
    assert "pyflowmap.ops" in GRAPH["pyflowmap.nn.functional"]


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _layer(module: str) -> int:
    if module in TOP:
        return 3
    if module.startswith(APPS):
        return 2
    if module.startswith("pyflowmap.training"):
        return 1
    return 0


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "pyflowmap"))
def test_layers(module):
    """A module imports only from its own layer or below; an app never imports the other app."""
    for target in GRAPH[module]:
        assert _layer(target) <= _layer(module), f"{module} (layer {_layer(module)}) imports {target}"
        if _layer(module) == 2 and _layer(target) == 2:
            assert target.split(".")[1] == module.split(".")[1], f"app {module} imports the other app's {target}"


OLD_IMPORTS = """
import warnings
warnings.simplefilter("error", DeprecationWarning)
import pyflowmap as pf
from pyflowmap import reference, toy2d, training, consistency
moved = []
def old(stmt):
    try:
        exec(stmt, {})
    except DeprecationWarning as w:
        moved.append(str(w))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ns = {}
            exec(stmt, ns)
            return ns
    raise AssertionError(f"no DeprecationWarning for {stmt}")
ns = old("from pyflowmap.train import CHECKPOINT, NonFiniteTraining, Trainer, TrainerBase")
assert ns["Trainer"] is toy2d.Trainer and ns["TrainerBase"] is training.TrainerBase and ns["CHECKPOINT"] == "checkpoint.pt"
ns = old("from pyflowmap.config import ConfigBase, TrainConfig, build_model")
assert ns["ConfigBase"] is training.LoopConfig and ns["TrainConfig"] is toy2d.TrainConfig
ns = old("from pyflowmap.checkpoint import atomic_write, load_checkpoint")
assert ns["load_checkpoint"] is training.load_checkpoint
ns = old("from pyflowmap.evaluate import SAMPLERS, draw, evaluate")
assert ns["draw"] is pf.draw and ns["SAMPLERS"] == ("map", "euler", "heun")
ns = old("from pyflowmap.data import sample_data")
ns = old("from pyflowmap.metrics import checker_kl")
ns = old("from pyflowmap.interpolants import EDMSigmaPath")
assert ns["EDMSigmaPath"] is consistency.EDMSigmaPath
ns = old("from pyflowmap.times import ECTSchedule")
assert ns["ECTSchedule"] is consistency.ECTSchedule
ns = old("from pyflowmap.nn.attention import math_attention")
assert ns["math_attention"] is reference.math_attention
print(len(moved))
"""


def test_old_import_paths_still_work_and_warn():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", OLD_IMPORTS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "9"
