"""The layout DESIGN.md asks for: no two of the project's modules import each other, directly or
through others (imports inside functions count), and importing a script starts no work."""

import ast
import glob
import importlib
import os
import sys

from conftest import ROOT

MODULES = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py")))


def imports_of(name):
    """The project's modules that `name` imports anywhere in its file (top level or lazily)."""
    tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_the_import_graph_has_no_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    assert graph["configurator"] == set() and "train" not in set().union(*graph.values())
    done, on_path = set(), []

    def visit(m):
        assert m not in on_path, "import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m])
        if m in done:
            return
        on_path.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        on_path.pop()
        done.add(m)
    for m in MODULES:
        visit(m)


def test_importing_a_script_starts_no_work(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["x", "--no-such-setting"])  # main() would refuse this at once
    for m in MODULES:
        importlib.import_module(m)
    assert capsys.readouterr() == ("", "")


def test_model_py_is_the_model_alone():
    """model.py imports torch and the standard library only; its one reach into the project is
    GPT.from_pretrained's delegation to hf_weights.py, which does not import model.py back."""
    tree = ast.parse(open(os.path.join(ROOT, "model.py")).read())
    for node in tree.body:  # the module's own imports
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert all(n.split(".")[0] in ("torch", "math", "dataclasses") for n in names), names
    lazy = [(fn.name, node.module) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef)
            for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.module in MODULES]
    assert lazy == [("from_pretrained", "hf_weights")]
    assert "model" not in imports_of("hf_weights")


def test_every_name_in_the_course_map_exists():
    """docs/course.md names the code as `file.py:function` or `file.py:Class.method`."""
    import re
    text = open(os.path.join(ROOT, "docs", "course.md")).read()
    refs = re.findall(r"`(\w+)\.py:([\w.]+)`", text)
    assert len(refs) > 40
    for module, name in refs:
        tree = ast.parse(open(os.path.join(ROOT, module + ".py")).read())
        scope = tree.body
        for part in name.split("."):
            found = [n for n in scope if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
            assert found, f"docs/course.md names {module}.py:{name}, which does not exist"
            scope = found[0].body
