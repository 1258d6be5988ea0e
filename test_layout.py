"""The project's shape, checked: imports go one way (libraries never import scripts; data, model and loss import
nothing of the project; no cycles), sample.py runs without train.py, train.py stays a script one reads in a
sitting (at most 600 lines, no function past 80 lines but main, at most 120)."""
import ast
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
PROJECT = {p.stem for p in HERE.glob("*.py") if not p.stem.startswith("test_")}
LIBRARIES = {"data": set(), "model": set(), "loss": set(), "settings": set(), "report": set(),
             "checkpoint": {"model"}, "muon": {"model"}}  # what each library may import of the project
PRODUCTION = ["data", "model", "loss", "settings", "report", "checkpoint", "muon", "train", "sample", "plot",
              "export_hf"]


def project_imports(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & PROJECT


def test_imports_go_one_way():
    graph = {m: project_imports(HERE / f"{m}.py") for m in PROJECT}
    for lib, allowed in LIBRARIES.items():
        assert graph[lib] <= allowed, f"{lib}.py imports {sorted(graph[lib] - allowed)} of the project"
    assert not {"train"} & (graph["sample"] | graph["plot"] | graph["export_hf"])

    def reach(m, seen=()):
        for n in graph[m]:
            assert n not in seen + (m,), f"an import cycle through {m} -> {n}"
            reach(n, seen + (m,))
    for m in graph:
        reach(m)


def test_sample_runs_without_train():
    code = "import sys, sample; assert 'train' not in sys.modules, sorted(sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_reads_in_a_sitting():
    lines = (HERE / "train.py").read_text().splitlines()
    assert len(lines) <= 600, f"train.py has {len(lines)} lines, expected at most 600"
    for m in PRODUCTION:
        for node in ast.walk(ast.parse((HERE / f"{m}.py").read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n, limit = node.end_lineno - node.lineno + 1, 120 if (m, node.name) == ("train", "main") else 80
                assert n <= limit, f"{m}.py: {node.name} has {n} lines, expected at most {limit}"


def test_the_loop_comes_first():
    """main() is the first function of train.py: what one reads after the settings is the loop."""
    tree = ast.parse((HERE / "train.py").read_text())
    first = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    assert first.name == "main"
