"""allocator.py and the CLI's re-execution of ``philora train`` with TCMalloc preloaded."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from philora.run.allocator import DONE, ENV, find_library, preload_env
from philora.core.errors import PhiloraError


@pytest.fixture
def libdir(tmp_path):
    d = tmp_path / "lib"
    d.mkdir()
    (d / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return d


def test_found_library_is_preloaded_once(libdir):
    lib = str(libdir / "libtcmalloc_minimal.so.4")
    assert find_library([str(libdir.parent), str(libdir)]) == lib
    env = preload_env({"LD_PRELOAD": "/x/other.so", "A": "1"}, "linux", [str(libdir)])
    assert env["LD_PRELOAD"] == f"{lib} /x/other.so" and env[DONE] == lib and env["A"] == "1"
    assert preload_env(env, "linux", [str(libdir)]) is None  # the re-executed process: no second exec


@pytest.mark.parametrize("env, platform", [({ENV: "system"}, "linux"), ({}, "darwin"), ({}, "win32")])
def test_system_allocator_when_asked_or_not_linux(libdir, env, platform):
    assert preload_env(env, platform, [str(libdir)]) is None


def test_no_library_no_change(tmp_path):
    assert find_library([str(tmp_path)]) is None
    assert preload_env({}, "linux", [str(tmp_path)]) is None


def test_named_library_and_a_missing_one(libdir, tmp_path):
    other = tmp_path / "libjemalloc.so.2"
    other.write_bytes(b"")
    assert preload_env({ENV: str(other)}, "linux", [str(libdir)])["LD_PRELOAD"] == str(other)
    with pytest.raises(PhiloraError, match=f"{ENV}=/nope/lib.so: no such file"):
        preload_env({ENV: "/nope/lib.so"}, "linux", [str(libdir)])


def _philora(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "philora", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_bad_env_is_a_one_line_error(tmp_path):
    p = _philora(["train", "--help"], dict(os.environ, **{ENV: "/nope/lib.so"}), tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [f"philora: error: {ENV}=/nope/lib.so: no such file; give a "
                                             f"malloc library's path (a .so), or 'system' for the system's allocator"]


@pytest.mark.skipif(not sys.platform.startswith("linux") or find_library() is None,
                    reason="needs a TCMalloc library on this machine (apt install libtcmalloc-minimal4)")
def test_train_runs_with_tcmalloc_loaded(tmp_path):
    """The real thing: `philora train` re-executes itself with TCMalloc mapped into the process
    (the line is printed only when /proc/self/maps shows it) and trains; PHILORA_MALLOC=system
    keeps glibc's malloc."""
    env = {k: v for k, v in os.environ.items() if k not in (DONE, ENV)}
    out = tmp_path / "run"
    p = _philora(["train", f"training_config.output_dir={out}", "training_config.max_steps=1",
                  "training_config.report_samples=0", "training_config.eval_steps=0"], env, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"malloc: {find_library()}" in p.stdout
    assert (out / "adapter_model.safetensors").exists()
    p = _philora(["train", f"training_config.output_dir={tmp_path / 'run2'}", "training_config.max_steps=1",
                  "training_config.report_samples=0", "training_config.eval_steps=0"], dict(env, **{ENV: "system"}),
                 tmp_path)
    assert p.returncode == 0 and "malloc:" not in p.stdout
