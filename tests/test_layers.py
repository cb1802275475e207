"""The package's shape: folders are the layers, lower first; the README's code map shows them.

Read from the source with ``ast`` (nothing is imported), so an import hidden in a function or made
through importlib is found as surely as a top-level one. The one map of the layers is ``LAYERS``:
a module may import modules of its own folder or of lower folders, never higher ones; within a
folder there is no cycle. The files at the top of the package (``cli.py``, ``__main__.py``,
``__init__.py``) are the top layer.

The tests mirror the package: tests/<layer>/ holds the test files of that layer's modules, and each
of them imports something from philora.<layer> (the layer whose modules it tests; a file may also
use higher layers to build its inputs, e.g. a training run for an adapter check). The few files
that test the product as a whole stay at the top of tests/, each listed in ``TOP_TESTS`` with why.
"""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "philora"
README = ROOT / "README.md"

# The one layer map: lower first. The top-level files of the package come last.
LAYERS = ("lora", "core", "data", "model", "run", "use", "export")
TOP = len(LAYERS)
# Modules that import philora modules inside functions: only to keep start-up fast.
LAZY_OK = {"philora.cli"}  # `philora --help` must not import torch and transformers
# Test files at the top of tests/: they test the product as a whole, not one layer.
TOP_TESTS = {
    "test_cli.py": "the philora command over every layer",
    "test_layers.py": "the package's shape",
    "test_bench.py": "bench/, outside the package",
    "test_gpu_script.py": "bench/gpu.sh and gpu_check.py, outside the package",
    "test_skip_policy.py": "tests/skip_policy.py, the suite's own rule",
    "test_real_roundtrip.py": "the real model through merge, export and llama.cpp, by the CLI",
}
SHARED = {"fixtures"}  # folders of tests/ that are not layers: data the tests read
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 400


def modules(package: Path = None):
    """{dotted name: path} of every module in the package."""
    package = package or PACKAGE
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["philora"] + parts)] = path
    return out


def folder(module: str) -> str:
    """The layer folder of ``philora.x.y`` ('x'), or '' for the package's top-level files."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def layer(module: str) -> int:
    f = folder(module)
    return LAYERS.index(f) if f else TOP


def _resolve(module: str, path: Path, level: int, name: str) -> str:
    """The absolute module a relative import names."""
    base = module.split(".")
    if path.name != "__init__.py":
        base = base[:-1]  # a module's package
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports(module: str, path: Path, known):
    """(imported philora module, imported names, inside a function?, line) for every import form:
    ``from .x import``, ``from philora.x import``, ``import philora.x``, importlib."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("philora")):
            target = _resolve(module, path, node.level, node.module or "") if node.level else node.module
            for a in node.names:  # `from .pkg import mod` imports a module
                sub = f"{target}.{a.name}"
                yield (sub, [], lazy, node.lineno) if sub in known else (target, [a.name], lazy, node.lineno)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("philora"):
                    yield a.name, [], lazy, node.lineno
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("philora"):
            yield node.args[0].value, [], lazy, node.lineno


def graph(package: Path = None):
    mods = modules(package)
    return {m: list(imports(m, p, mods)) for m, p in mods.items()}, mods


def test_every_module_is_in_a_layer_folder():
    mods = modules()
    stray = [m for m in mods if folder(m) == "" and m not in ("philora", "philora.cli", "philora.__main__")]
    assert not stray, f"put these modules in a layer folder {LAYERS}: {stray}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS), f"folders {sorted(folders)} vs LAYERS {LAYERS}"


def test_imports_go_to_lower_or_same_layers(package=None):
    edges, _ = graph(package)
    wrong = [f"{src} (layer {folder(src) or 'top'}) imports {dst} (layer {folder(dst) or 'top'}), line {line}"
             for src, out in edges.items() for dst, _, _, line in out
             if dst.startswith("philora") and layer(dst) > layer(src)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    edges, mods = graph()
    nxt_of = {src: {dst for dst, *_ in out if dst != src and dst in mods and dst != "philora"}
              for src, out in edges.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(nxt_of.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(nxt_of):
        if node not in state:
            visit(node, [])


def _private_definitions(tree) -> set:
    """Private names a module defines: functions, classes, assigned names and attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_private_name_crosses_modules(package=None):
    edges, mods = graph(package)
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in mods.items()}
    own = {m: _private_definitions(t) for m, t in trees.items()}
    wrong = [f"{src}: from {dst} import {n}, line {line}" for src, out in edges.items()
             for dst, names, _, line in out for n in names
             if n.startswith("_") and not n.startswith("__") and dst != src]
    # Attributes and methods: `x._name` where _name is private to another philora module (and not
    # also a private attribute of torch's own tensors and modules, such as Tensor._version).
    import torch
    torch_own = set(dir(torch.Tensor)) | set(dir(torch.nn.Module())) | set(dir(torch.nn.Parameter))
    for m, tree in trees.items():
        others = set().union(*(own[o] for o in trees if o != m)) - own[m] - torch_own
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in others and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                wrong.append(f"{m}: uses another module's private '{node.attr}', line {node.lineno}")
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_only_to_save_start_up():
    edges, _ = graph()
    wrong = [f"{src}: imports {dst} inside a function, line {line}" for src, out in edges.items()
             for dst, _, lazy, line in out if lazy and src not in LAZY_OK]
    assert not wrong, "\n".join(wrong)


def test_lora_imports_torch_only():
    wrong = []
    for path in (PACKAGE / "lora").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                if top != "torch" and top not in sys.stdlib_module_names:
                    wrong.append(f"{path.name}: import {name}")
    assert not wrong, "philora/lora/ stays pure torch:\n" + "\n".join(wrong)


def test_sizes():
    wrong = []
    for m, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE_LINES:
            wrong.append(f"{m}: {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    wrong.append(f"{m}.{node.name}: {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not wrong, "\n".join(wrong)


def readme_map():
    """The README code map's rows: [(folder or file, text)] in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `src/philora/([a-z_]+)(?:/|\.py)` \| (.*) \|$", section, flags=re.M)


def test_readme_code_map_follows_the_layers():
    rows = [name for name, _ in readme_map()]
    assert rows == list(LAYERS) + ["cli"], f"README code map rows {rows}; expected {list(LAYERS) + ['cli']}"
    described = " ".join(text for _, text in readme_map())
    missing = [p.stem for f in LAYERS for p in (PACKAGE / f).glob("*.py")
               if p.stem != "__init__" and f"`{p.stem}`" not in described]
    assert not missing, f"README code map does not name these modules: {missing}"


def mirror_problems(tests: Path, known) -> list:
    """Where tests/ does not mirror the package (see the module docstring); [] when it does."""
    wrong, seen = [], {}
    for d in sorted(p for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))):
        if d.name not in LAYERS and d.name not in SHARED:
            wrong.append(f"tests/{d.name}/ is not a layer folder {LAYERS}")
    for path in sorted(tests.rglob("*.py")):
        rel = path.relative_to(tests)
        if "__pycache__" in rel.parts or rel.parts[0] in SHARED:
            continue
        if path.name == "__init__.py":  # rootdir-relative imports: a package here changes every test id
            wrong.append(f"tests/{rel}: no __init__.py in tests/")
            continue
        if not path.name.startswith("test_"):
            if len(rel.parts) > 1:
                wrong.append(f"tests/{rel}: only test files in layer folders (plugins beside conftest.py)")
            continue
        if path.name in seen:  # pytest's default import mode imports test files by basename
            wrong.append(f"tests/{rel}: same name as tests/{seen[path.name]}")
        seen[path.name] = rel
        if len(rel.parts) == 1:
            if path.name not in TOP_TESTS:
                wrong.append(f"tests/{rel}: put it in the folder of the layer it tests, or in TOP_TESTS with why")
            continue
        if len(rel.parts) > 2 or rel.parts[0] not in LAYERS:
            wrong.append(f"tests/{rel}: test files sit in tests/<layer>/, one level down")
            continue
        layers = {folder(dst) for dst, *_ in imports("tests", path, known)}
        if rel.parts[0] not in layers:
            wrong.append(f"tests/{rel} imports nothing from philora.{rel.parts[0]} "
                         f"(it imports from {sorted(layers - {''}) or 'no layer'})")
    return wrong


def test_tests_mirror_the_package():
    tests = ROOT / "tests"
    assert not mirror_problems(tests, modules()), "\n".join(mirror_problems(tests, modules()))
    assert set(TOP_TESTS) <= {p.name for p in tests.glob("test_*.py")}, "TOP_TESTS names a file not at the top"


def test_the_mirror_check_catches_misplaced_tests(tmp_path):
    files = {
        "conftest.py": "", "plugin.py": "", "fixtures/x.json": "{}",  # shared: fine
        "test_cli.py": "", "lora/test_ok.py": "from philora.lora import LoRALinear\n",
        "core/test_lazy.py": "def test():\n    from philora.core import config\n",  # any import form counts
        "model/test_elsewhere.py": "from philora.run.train import train\n",
        "use/test_cli.py": "from philora.use import merge\n",
        "helpers/test_h.py": "", "data/deeper/test_d.py": "from philora.data import build\n",
        "test_top.py": "", "run/__init__.py": "", "export/plugin.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    got = mirror_problems(tmp_path, modules())
    expected = ["tests/helpers/ is not a layer folder", "tests/model/test_elsewhere.py imports nothing from "
                "philora.model (it imports from ['run'])", "tests/use/test_cli.py: same name as tests/test_cli.py",
                "tests/data/deeper/test_d.py: test files sit in", "tests/helpers/test_h.py: test files sit in",
                "tests/test_top.py: put it in the folder",
                "tests/run/__init__.py: no __init__.py", "tests/export/plugin.py: only test files"]
    assert sorted(next((e for e in expected if g.startswith(e)), g) for g in got) == sorted(expected), got


@pytest.mark.parametrize("bad, message", [
    ("from ..run.train import train\n", "imports philora.run.train"),
    ("import philora.use.merge\n", "imports philora.use.merge"),
    ("import importlib\nimportlib.import_module('philora.export.gguf')\n", "imports philora.export.gguf"),
    ("def f():\n    from ..model.loss import _private\n", "_private"),
    ("def f(x):\n    return x._hidden()\n", "private '_hidden'"),
])
def test_the_checks_catch_violations(tmp_path, bad, message):
    # A copy of the package with one bad import added to a low-level module must fail.
    import shutil
    copy = tmp_path / "philora"
    shutil.copytree(PACKAGE, copy)
    target = copy / "core" / "config.py"
    target.write_text(target.read_text() + "\n" + bad)
    (copy / "model" / "extra.py").write_text("def _hidden():\n    return 1\n")
    failures = []
    for check in (test_imports_go_to_lower_or_same_layers, test_no_private_name_crosses_modules):
        try:
            check(copy)
        except AssertionError as e:
            failures.append(str(e))
    assert any(message in f for f in failures), failures
