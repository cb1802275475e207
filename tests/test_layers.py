"""The package's import structure: layers, lower first, no cycles, no private names across modules.

Read from the source with ``ast`` (nothing is imported), so a cycle hidden behind a function-level
import is found as surely as a top-level one.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "philora"

# Lower layers first; a module may import its own layer or lower ones (and no cycle within one).
LAYERS = [
    ("errors", "config", "models", "devices", "diskio", "runlock", "preempt"),
    ("formats", "loss", "batching", "attention", "rope", "serving", "dropout", "lora", "fused", "memory", "records", "examples", "datastore", "encoding", "allocator"),
    ("data", "quant", "adapter", "dora"),
    ("tiny", "inject"),
    ("loading",),
    ("fsdp", "distributed", "checkpoint", "metrics", "trackers", "neftune", "optim", "generate", "evalgen"),
    ("train",),
    ("merge",),
    ("report", "data_check", "adapter_check", "adapter_convert", "export_gguf", "export_ollama", "export_vocab"),
    ("cli", "__main__", "__init__"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# Modules that import philora modules inside functions: only to keep start-up fast.
LAZY_OK = {"cli"}  # `philora --help` must not import torch and transformers


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return "lora" if rel.parts[0] == "lora" else rel.name


def imports(path: Path):
    """(imported philora module, names, inside a function?) for each relative import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = (node.module or "").split(".")[0]
            if path.parent.name == "lora" and node.level == 1:
                continue  # inside philora.lora: its own files
            if base:
                yield base, [a.name for a in node.names], id(node) in in_function
            else:  # from . import x, y
                for a in node.names:
                    yield a.name, [], id(node) in in_function
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("philora"):
            raise AssertionError(f"{path.name}: absolute import of {node.module}; use a relative one")


def graph():
    edges = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        for dst, names, lazy in imports(path):
            edges.setdefault(src, []).append((dst, names, lazy, path.name))
    return edges


def test_every_module_has_a_layer():
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert not modules - set(LAYER), f"add these modules to LAYERS: {sorted(modules - set(LAYER))}"


def test_imports_go_to_lower_or_same_layers():
    wrong = [f"{file}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
             for src, out in graph().items() for dst, _, _, file in out
             if src in LAYER and LAYER.get(dst, -1) > LAYER[src]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges = {src: {dst for dst, *_ in out if dst != src} for src, out in graph().items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_no_private_name_crosses_modules():
    wrong = [f"{file}: from {dst} import {n}" for src, out in graph().items()
             for dst, names, _, file in out for n in names if n.startswith("_") and dst != src]
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_only_to_save_start_up():
    wrong = [f"{file}: imports {dst} inside a function" for src, out in graph().items()
             for dst, _, lazy, file in out if lazy and src not in LAZY_OK]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("bad, message", [
    ("from .train import train\n", "imports train"),
    ("def f():\n    from .loss import _private\n", "_private"),
])
def test_the_checks_catch_violations(tmp_path, monkeypatch, bad, message):
    # A copy of the package with one bad import added to a low-level module must fail.
    import shutil
    copy = tmp_path / "philora"
    shutil.copytree(PACKAGE, copy)
    (copy / "config.py").write_text((copy / "config.py").read_text() + "\n" + bad)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    failures = []
    for check in (test_imports_go_to_lower_or_same_layers, test_no_private_name_crosses_modules):
        try:
            check()
        except AssertionError as e:
            failures.append(str(e))
    assert any(message in f for f in failures), failures
