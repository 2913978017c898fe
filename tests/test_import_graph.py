"""The design's one-way data flow, by the command anyone can run: python scripts/import_graph.py.

Deferred imports (inside functions) count as edges: a cycle hidden in a function
is still a cycle of the design.
"""

import subprocess
import sys

from conftest import REPO

SCRIPT = f"{REPO}/scripts/import_graph.py"


def _graph(*args):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)
    edges = {}
    for line in result.stdout.splitlines():
        if " -> " in line and not line.startswith("cycle"):
            module, targets = line.split(" -> ")
            edges[module] = {name.rstrip("*") for name in targets.split(", ")}
    return result, edges


def test_src_has_no_import_cycle():
    result, edges = _graph()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].endswith(": no import cycle")
    # The three repairs of issue 22, edge by edge.
    assert not edges["alexnet_jax.data.sources"] & {"alexnet_jax.data.packed", "alexnet_jax.data.pipeline"}
    assert {"alexnet_jax.data.sources", "alexnet_jax.data.packed"} <= edges["alexnet_jax.data.registry"]
    assert "alexnet_jax.commands.evaluate" not in edges["alexnet_jax.training.train"]
    assert "alexnet_jax.evaluation.core" in edges["alexnet_jax.training.train"] & edges["alexnet_jax.commands.evaluate"]
    assert {"alexnet_jax.checkpointing.manifest", "alexnet_jax.checkpointing.storage"} <= edges[
        "alexnet_jax.checkpointing.checkpoint"
    ]


def test_a_cycle_through_a_deferred_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("def late():\n    from pkg import a\n")
    (package / "d.py").write_text("import pkg.a\n")  # into the cycle, not on it
    result, edges = _graph(f"--root={tmp_path}", "--package=pkg")
    assert result.returncode == 1
    assert edges["pkg.sub.c"] == {"pkg.a"} and edges["pkg.sub.b"] == {"pkg.sub.c"}
    assert "pkg.a -> pkg.sub.b -> pkg.sub.c -> pkg.a" in result.stdout
    assert "pkg.d" not in result.stdout.split("cycle among")[1]
    assert result.stdout.splitlines()[-1].endswith(": 1 import cycle(s)")
