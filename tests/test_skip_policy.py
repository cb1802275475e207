"""tests/skip_policy.py: a pytest run (in a subprocess, on a few made-up test files) fails when a test
skipped, naming it and its reason, and passes when the only skip is on the GPU allow-list."""

import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def pytest_run(tmp_path, files):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # rootdir: node ids as in this repository
    (tmp_path / "conftest.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n"
                                          f"pytest_plugins = ['skip_policy']\n")
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout


def test_a_skip_fails_the_run_and_says_which_and_why(tmp_path):
    rc, out = pytest_run(tmp_path, {
        "tests/test_a.py": "def test_ok():\n    pass\n",
        "tests/test_b.py": "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_never():\n    pass\n",
        "tests/test_c.py": "import pytest\n\ndef test_skips():\n    pytest.skip('needs a thing')\n",
    })
    assert rc == 1, out
    assert "2 unexpected skip(s): the run fails" in out
    assert "tests/test_b.py: could not import 'no_such_module_here'" in out
    assert "tests/test_c.py::test_skips: needs a thing" in out
    assert "bash scripts/setup.sh --tests" in out and "1 passed, 2 skipped" in out


def test_only_a_skip_of_the_allow_list_passes(tmp_path):
    rc, out = pytest_run(tmp_path, {
        "tests/test_a.py": "def test_ok():\n    pass\n",
        "tests/test_gpu_script.py": "import pytest\n\ndef test_no_cuda_no_check():\n    pytest.skip('a GPU is here')\n",
    })
    assert rc == 0, out
    assert "unexpected skip" not in out and "1 passed, 1 skipped" in out


def test_a_failure_stays_a_failure(tmp_path):
    rc, out = pytest_run(tmp_path, {"tests/test_a.py": "def test_bad():\n    assert False\n"})
    assert rc == 1 and "1 failed" in out and "unexpected skip" not in out


def test_pytest_prints_skip_reasons():
    text = (TESTS.parent / "pyproject.toml").read_text()
    assert 'addopts = "-q -rs"' in text
