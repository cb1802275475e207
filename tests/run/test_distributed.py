"""Multi-process training: 2 gloo CPU processes under torchrun against single-process runs.

One torchrun launch (module fixture) runs several trainings through ``philora.cli.main`` in the
same two processes: DDP, FSDP with accumulation, DDP with dropout, QLoRA (4-bit base) under DDP,
a resume of the dropout run from its step-2 checkpoint, and a run that must fail on rank 0's
output-dir check. The single-process references run in this process meanwhile.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from philora.run import distributed
from philora.data.batching import epoch_order
from philora.cli import main as cli_main
from philora.run.distributed import World
from philora.core.errors import PhiloraError
from philora.run.train import micro_batches

STEPS, SAVE = 4, 2
FINAL = ("adapter_model.safetensors", "adapter_config.json", f"checkpoint-{STEPS}")
# Adam divides by sqrt(v): where a gradient is near 0, float-rounding differences between
# reduction orders move single elements by ~3e-5 (a wrong gradient moves them by ~lr = 2e-3).
TOL = dict(atol=1e-4, rtol=1e-3)

DRIVER = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    import torch.distributed as dist
    from philora.cli import main

    # train() leaves the group it created; a torchrun worker cannot join a second one, so keep
    # the first (created by philora.run.distributed.setup) up for every run, and leave it at the end.
    destroy, dist.destroy_process_group = dist.destroy_process_group, lambda *a, **k: None
    out, common = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    rc = {}
    def run(name, *args):
        rc[name] = main(["train", f"training_config.output_dir={out / name}", *common, *args])
    run("ddp", "training_config.per_device_train_batch_size=2", "peft_config.lora_dropout=0.0")
    run("fsdp", "training_config.per_device_train_batch_size=1", "peft_config.lora_dropout=0.0",
        "training_config.gradient_accumulation_steps=2", "training_config.fsdp=true")
    run("dropout", "training_config.per_device_train_batch_size=2", "peft_config.lora_dropout=0.2")
    run("qlora", "training_config.per_device_train_batch_size=2", "peft_config.lora_dropout=0.0",
        "model.quantization=nf4")
    if rank == 0:  # as if killed after the step-__SAVE__ checkpoint: the later outputs are gone
        shutil.copytree(out / "dropout", out / "resumed")
        for p in __FINAL__:
            q = out / "resumed" / p
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    dist.barrier()
    run("resumed", "training_config.per_device_train_batch_size=2", "peft_config.lora_dropout=0.2",
        "--resume")
    run("taken", "training_config.per_device_train_batch_size=2")  # output_dir "taken" exists
    (out / f"rc-{rank}.json").write_text(json.dumps(rc))
    destroy()
""").replace("__SAVE__", str(SAVE)).replace("__FINAL__", repr(FINAL))


def common_args(tiny_path):
    return [f"model.name_or_path={tiny_path}", f"training_config.max_steps={STEPS}",
            f"training_config.save_steps={SAVE}", "training_config.save_total_limit=0",
            "training_config.eval_steps=0", "training_config.eval_max_samples=5",
            "training_config.per_device_eval_batch_size=2", "training_config.logging_steps=1",
            "training_config.report_samples=0", "training_config.progress_bar=false",
            "data.max_length=128"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """{name: output dir} of the 2-process runs and the single-process references."""
    root = tmp_path_factory.mktemp("dist")
    common = common_args(tiny_model_dir)
    (root / "taken").mkdir()
    (root / "taken" / "metrics.jsonl").write_text("")
    (root / "driver.py").write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.Popen([*torchrun, str(root / "driver.py"), str(root), *common],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Meanwhile, here: the same global batch in one process.
        one = [*common, "training_config.per_device_train_batch_size=4", "peft_config.lora_dropout=0.0"]
        assert cli_main(["train", f"training_config.output_dir={root / 'single'}", *one]) == 0
        assert cli_main(["train", f"training_config.output_dir={root / 'qlora-single'}", *one,
                         "model.quantization=nf4"]) == 0
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # SIGTERM: torchrun stops its workers (SIGKILL would orphan them)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert proc.returncode == 0, log[-3000:]
    dirs = {p.name: p for p in root.iterdir() if p.is_dir()}
    return {"dirs": dirs, "log": log, "common": common, "root": root,
            "rc": [json.loads((root / f"rc-{r}.json").read_text()) for r in (0, 1)]}


def adapter(path):
    return load_file(str(Path(path) / "adapter_model.safetensors"))


def metrics(path):
    return [json.loads(line) for line in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def assert_adapters(a, b, **tol):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol, msg=k)


def test_ddp_equals_single_process_with_the_same_global_batch(runs):
    d = runs["dirs"]
    assert runs["rc"] == [{"ddp": 0, "fsdp": 0, "dropout": 0, "qlora": 0, "resumed": 0, "taken": 2}] * 2
    assert max(v.abs().max() for k, v in adapter(d["ddp"]).items() if "lora_B" in k) > 1e-4  # it trained
    assert_adapters(d["ddp"], d["single"], **TOL)
    m2, m1 = metrics(d["ddp"]), metrics(d["single"])
    # Only rank 0 writes: each step logged once. Losses and token counts are global.
    assert [r["step"] for r in m2 if "loss" in r] == list(range(1, STEPS + 1))
    for a, b in zip(m2, m1):
        assert a["step"] == b["step"] and a.get("tokens") == b.get("tokens")
        for key in ("loss", "grad_norm", "eval_loss"):  # eval: 5 examples on 2 ranks, uneven
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert (d["ddp"] / f"checkpoint-{SAVE}" / "trainer_state.json").exists()


def test_fsdp_with_accumulation_equals_single_process(runs):
    assert_adapters(runs["dirs"]["fsdp"], runs["dirs"]["single"], **TOL)
    for a, b in zip(metrics(runs["dirs"]["fsdp"]), metrics(runs["dirs"]["single"])):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_qlora_under_ddp_equals_single_process(runs):
    d = runs["dirs"]
    assert_adapters(d["qlora"], d["qlora-single"], **TOL)
    a, b = adapter(d["qlora"]), adapter(d["ddp"])  # a 4-bit base: not the same run as fp32
    assert max((a[k] - b[k]).abs().max() for k in a) > 1e-4
    for a, b in zip(metrics(d["qlora"]), metrics(d["qlora-single"])):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_killed_two_process_run_resumes_bit_identically(runs):
    d = runs["dirs"]
    assert f"resumed from {d['resumed'] / f'checkpoint-{SAVE}'}" in runs["log"]
    assert_adapters(d["resumed"], d["dropout"], atol=0, rtol=0)
    # Dropout was on (otherwise the bit-identical resume would prove little).
    a, b = adapter(d["dropout"]), adapter(d["ddp"])
    assert max((a[k] - b[k]).abs().max() for k in a) > 1e-4
    # The resumed run's log continues the killed one's: every step once, the same numbers.
    timeless = lambda recs: [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")}  # noqa: E731
                             for r in recs]
    assert timeless(metrics(d["resumed"])) == timeless(metrics(d["dropout"]))
    state = json.loads((d["resumed"] / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["samples_seen"] == STEPS * 4 and state["world_size"] == 2


def test_error_on_rank0_stops_every_rank_with_one_line(runs):
    assert "already holds a run" in runs["log"]
    lines = [ln for ln in runs["log"].splitlines() if ln.startswith("philora: error:")]
    assert len(lines) == 2  # both ranks print it, with no traceback
    assert "Traceback" not in runs["log"]


def test_resume_on_a_different_world_size(runs, tmp_path):
    # The 2-process run's step-2 checkpoint, continued by one process with the same global batch.
    src = runs["dirs"]["ddp"]
    out = tmp_path / "one"
    out.mkdir()
    shutil.copytree(src / f"checkpoint-{SAVE}", out / f"checkpoint-{SAVE}")
    base = [f"training_config.output_dir={out}", *runs["common"], "peft_config.lora_dropout=0.0"]
    with pytest.raises(PhiloraError, match="global batch of 4 .* this run's is 2"):
        from philora.core.config import load_config
        from philora.run.train import train
        train(load_config(None, base + ["training_config.per_device_train_batch_size=2"]), resume=True)
    assert cli_main(["train", *base, "training_config.per_device_train_batch_size=4", "--resume"]) == 0
    assert_adapters(out, src, **TOL)


# -- in-process units: data sharding, seeds, checks --------------------------------------------

def test_ranks_split_each_global_micro_batch():
    examples = [{"i": i} for i in range(10)]
    single = micro_batches(examples, 3, 4, World(), seed=1, shuffle=True)
    ranks = [micro_batches(examples, 3, 2, World(r, 2), seed=1, shuffle=True) for r in (0, 1)]
    for _ in range(6):  # across the epoch boundary too
        assert next(single) == next(ranks[0]) + next(ranks[1])
    assert [e["i"] for e in next(micro_batches(examples, 10, 2, World(), 1, True))] == epoch_order(10, 1, 1)[:2]


def test_step_seeds_differ_by_rank_and_step():
    seeds = {distributed.step_seed(42, r, s) for r in range(4) for s in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2 ** 63 for s in seeds)
    assert distributed.step_seed(42, 1, 7) == distributed.step_seed(42, 1, 7)
    assert distributed.step_seed(43, 1, 7) != distributed.step_seed(42, 1, 7)


def test_world_size_checks_are_one_line():
    from philora.core.config import load_config
    cfg = load_config(None, ["training_config.per_device_train_batch_size=2"])
    with pytest.raises(PhiloraError) as e:
        distributed.check_run(World(0, 4), cfg, 7)
    assert "\n" not in str(e.value) and "7 examples" in str(e.value) and "fewer processes" in str(e.value)
    distributed.check_run(World(0, 4), cfg, 8)
    distributed.check_run(World(), cfg, 1)  # one process: small data just repeats, as before
    qlora_fsdp = load_config(None, ["training_config.fsdp=true", "model.quantization=nf4"])
    with pytest.raises(PhiloraError, match="fsdp: false") as e:
        distributed.check_run(World(0, 2), qlora_fsdp, 400)
    assert "\n" not in str(e.value)
    distributed.check_run(World(), qlora_fsdp, 400)  # one process: no FSDP, QLoRA runs
    bnb = pytest.importorskip("bitsandbytes")
    from philora.run.fsdp import FSDPLoRA
    with pytest.raises(PhiloraError, match="fsdp: false"):
        FSDPLoRA(torch.nn.Sequential(bnb.nn.Linear4bit(64, 64)), torch.device("cpu"))
    with pytest.raises(PhiloraError) as e:
        distributed.check_resume(World(0, 4), {"step": 3, "samples_seen": 24, "world_size": 2}, 2, 2)
    assert "\n" not in str(e.value) and "global batch of 8" in str(e.value) and "= 8" in str(e.value)
    distributed.check_resume(World(0, 4), {"step": 3, "samples_seen": 24, "world_size": 2}, 2, 1)
    distributed.check_resume(World(), {"step": 0, "samples_seen": 0}, 3, 1)


def test_on_main_single_process():
    assert distributed.on_main(World(), lambda: 5) == 5
    with pytest.raises(PhiloraError, match="nope"):
        distributed.on_main(World(), lambda: (_ for _ in ()).throw(PhiloraError("nope")))
