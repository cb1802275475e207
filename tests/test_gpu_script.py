"""bench/gpu.sh + bench/gpu_check.py, the GPU check, on CPU: the dry run's smoke tests pass and
the longest-sequence search runs; the speed phase turns worker results into the table; phases
past the time budget are skipped and said so; the wheels that travel with the tree are there."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"philora_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
membench = load("memory")


def test_longest_search_finds_the_threshold():
    for limit in (1, 700, 1000, 5000):
        calls = []

        def fits(n):
            calls.append(n)
            return n <= limit

        n, probes = membench.longest(fits, 100, 4000, 50)
        if limit < 100:
            assert n == 0 and calls == [100]
        else:
            assert n <= min(limit, 4000) < n + 50 or n == 4000
            assert probes == [(c, c <= limit) for c in calls]
        assert len(calls) <= 12


def test_dry_run_smoke_and_longest(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--dry-run", "--phases", "smoke", "longest", "--systems", "philora",
                         "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert rc == 0 and all(v["ok"] for v in r["smoke"].values())
    assert r["smoke"]["fused"]["fp32_dropout0.1"] < 1e-5  # the fused path == the plain one
    assert r["smoke"]["packing"]["fp32"] < 1e-4  # one packed row == each conversation alone
    assert r["longest"]["philora"]["longest"] > 0
    assert "| philora |" in (out / "results.md").read_text()


def test_speed_phase_makes_the_table(tmp_path, monkeypatch):
    d = tmp_path
    shape = gpu_check.bench.SHAPES["tiny"]
    gpu_check.bench.make_model_dir(d / "model", shape)
    jobs = []

    def fake_worker(job, d, name):
        jobs.append(job)
        return {"tokens_per_s": 1000.0 if job["system"] == "philora" else 400.0, "peak_bytes": 2 ** 30,
                "loss": 7.5, "wall_s": 60.0, "startup_s": 20.0}  # (run_worker adds the last two)

    monkeypatch.setattr(gpu_check.bench, "run_worker", fake_worker)
    monkeypatch.setattr(gpu_check.bench, "matmul_flops", lambda dtype: 1e12)
    args = SimpleNamespace(steps=3, warmup=1, batch=2, max_length=shape["max_length"], loss_steps=2, cuda=False)
    r = gpu_check.speed(args, d, shape, ["philora", "trl-padding-free"])
    assert [j["system"] for j in jobs] == ["philora", "trl-padding-free"]
    assert all(j["steps"] == 3 and j["batch"] == 2 for j in jobs)
    row = next(line for line in r["table"].splitlines() if line.startswith("| philora |"))
    assert "2.50" in row  # 1000 / 400 tok/s
    assert r["runs"]["philora"]["tokens_per_s"] == 1000.0 and r["flops_per_token"] > 0


def test_phases_past_the_budget_are_skipped(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--budget-s", "0", "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert all(f"- {p}: skipped" in text for p in ("smoke", "speed", "longest"))


def test_gpu_sh_and_its_wheels():
    script = BENCH / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "bench/gpu_check.py" in text and "--find-links bench/wheels" in text
    wheels = sorted(p.name.split("-")[0] for p in (BENCH / "wheels").glob("*.whl"))
    assert {"trl", "datasets", "dill", "multiprocess"} <= set(wheels)
    assert sum(p.stat().st_size for p in (BENCH / "wheels").glob("*.whl")) < 16 * 2 ** 20


def test_no_cuda_no_check(capsys):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real check would run")
    assert gpu_check.main(["--phases", "smoke"]) == 2
    assert "--dry-run" in capsys.readouterr().err
