"""The package's shape: no import cycle between its modules (counting imports inside functions too), and
source.py a leaf of values that imports nothing that reaches the network."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "shardstream"


def imports():
    """{module: set of sibling modules it imports anywhere in its body}."""
    out = {}
    for f in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        out[f.stem] = deps - {f.stem}
    return out


def test_no_import_cycle():
    graph = imports()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(d):] + [d])}")
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_source_is_a_leaf_of_values():
    assert imports()["source"] <= {"errors", "settings", "shards"}
    assert imports()["settings"] <= {"errors", "units"}          # a leaf too: the edges and source.py use it
