"""Preemption and one trainer per output_dir, with real signals and real processes.

* In process: a real SIGTERM / SIGINT sent to this process in the middle of an optimizer step
  stops the run after that step with a checkpoint, and the resumed run ends bit-identical to an
  uninterrupted one, with the same metrics.jsonl (the due eval and the open log window included).
* ``philora train`` in a subprocess: SIGTERM -> exit 143, one line, a verified checkpoint of the
  last logged step; a second SIGINT exits at once (130, nothing saved), a repeat within a second
  is the same request; a live run's lock refuses a second train or --resume naming its pid, and
  the lock of a run that died is taken over.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from philora.run import preempt
from philora.run.checkpoint import list_checkpoints, read_verified
from philora.run.metrics import read_metrics
from philora.run.preempt import Interrupted, SignalGuard
from philora.run.runlock import LOCK_NAME, LockedError, acquire
from philora.run.train import train

RUN = ["training_config.max_steps=6", "training_config.logging_steps=4", "training_config.eval_steps=3",
       "training_config.save_steps=2", "training_config.save_total_limit=0", "peft_config.lora_dropout=0.2"]


@pytest.fixture(scope="module")
def uninterrupted(small_model_dir, small_data, tmp_path_factory, helpers, philora_cache):
    out = tmp_path_factory.mktemp("whole") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHILORA_CACHE", str(philora_cache))
        train(helpers.make_cfg(out, small_model_dir, small_data, *RUN))
    return out


def signal_during_update(monkeypatch, sig, at_step):
    """Send ``sig`` to this process during the update of optimizer step ``at_step``: after that
    step's check, so the run stops after the next one."""
    calls = []

    class SignallingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            calls.append(1)
            if len(calls) == at_step:
                os.kill(os.getpid(), sig)
            return super().step(closure)
    monkeypatch.setattr(torch.optim, "AdamW", SignallingAdamW)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_the_step_and_the_resume_is_exact(tmp_path, small_model_dir, small_data, helpers,
                                                             uninterrupted, monkeypatch, sig, code):
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, *RUN)
    before = signal.getsignal(sig)
    signal_during_update(monkeypatch, sig, at_step=2)  # seen by step 3's check
    with pytest.raises(Interrupted) as e:
        train(cfg)
    assert signal.getsignal(sig) is before  # the guard put the previous handler back
    assert e.value.exit_code == code
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(signal.Signals(sig).name)
    assert f"after step 3 with a checkpoint in {out / 'checkpoint-3'}" in msg and "--resume" in msg
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / LOCK_NAME).exists()
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["eval_pending"] is True  # step 3's eval was due: the resumed run does it first
    assert state["window"]["tokens"] > 0  # steps 1-3 are not logged yet (logging_steps=4)
    monkeypatch.undo()

    train(cfg, resume=True)
    for k, v in helpers.adapter_tensors(uninterrupted).items():
        assert torch.equal(helpers.adapter_tensors(out)[k], v), k
    assert helpers.timeless_records(out) == helpers.timeless_records(uninterrupted)  # each step and each eval once, same numbers


def test_guard_outside_the_loop_stops_at_once_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with SignalGuard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises during the sleep
    assert "before training started" in str(e.value) and e.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    with SignalGuard() as guard:
        guard.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat within DUPLICATE_S: the same request
        assert guard.requested
        with pytest.raises(Interrupted, match="SIGTERM: done"):
            guard.immediate("done")  # a signal that came while deferring stops now


# -----------------------------------------------------------------------------
# philora train in a subprocess


def cli(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "philora", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def tail(path, n=3000):
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_for(proc, ready, what, timeout=240, log=None, every=0.02):
    """Poll ``ready()`` until it is true; fail if ``proc`` ends first or after ``timeout`` s (then
    ``proc`` is killed). ``log``: the file the run writes its output to (else its pipes)."""
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            said = tail(log) if log is not None else proc.communicate()
            raise AssertionError(f"the run ended before {what}: {said}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f": {tail(log)}" if log is not None else ""))
        time.sleep(every)


def logged_steps(out):
    return [r["step"] for r in read_metrics(out) if "loss" in r]


def test_sigterm_to_the_cli_saves_a_verified_checkpoint_and_exits_143(tmp_path, small_model_dir, small_data,
                                                                      helpers):
    out = tmp_path / "run"
    proc = cli(helpers.make_args(out, small_model_dir, small_data, "training_config.max_steps=100000"))
    try:
        wait_for(proc, lambda: len(logged_steps(out)) >= 2, "step 2")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    step = logged_steps(out)[-1]
    assert last == (f"philora: SIGTERM: stopped after step {step} with a checkpoint in "
                    f"{out / f'checkpoint-{step}'}; continue with the same command and --resume")
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step}"]
    read_verified(out / f"checkpoint-{step}")  # complete, every file as its manifest says
    assert not (out / LOCK_NAME).exists()


def test_lock_second_signal_and_stale_lock(tmp_path, small_model_dir, small_data, helpers):
    out = tmp_path / "run"
    # Slow steps (many accumulated micro-batches), so there is time to act within step 1.
    args = helpers.make_args(out, small_model_dir, small_data, "training_config.gradient_accumulation_steps=2000",
                             "training_config.max_steps=2")
    proc = cli(args)
    try:
        wait_for(proc, lambda: any("eval_loss" in r for r in read_metrics(out)), "the step-0 eval")
        time.sleep(0.5)  # into step 1
        # A second trainer, or a resume, on the same output_dir: refused, naming the live holder.
        for resume in (False, True):
            with pytest.raises(LockedError) as e:
                train(helpers.make_cfg(out, small_model_dir, small_data), resume=resume)
            helpers.one_line_error(e, f"pid {proc.pid} ", str(out))
        assert proc.poll() is None  # the first run goes on
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)  # within a second: the same request (torchrun's or Slurm's copy)
        time.sleep(preempt.DUPLICATE_S + 0.3)
        assert proc.poll() is None and not list_checkpoints(out)  # still finishing step 1
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)  # a real second request: out at once, without a checkpoint
        stdout, stderr = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "philora: second SIGINT: exiting at once; the latest checkpoint is kept"
    assert "Traceback" not in stderr and not list_checkpoints(out) and not logged_steps(out)
    assert waited < 30  # not after the step (thousands of micro-batches)
    # The dead run's lock file is still there, naming it: a new run takes it over.
    assert (out / LOCK_NAME).read_text().startswith(f"pid {proc.pid} ")
    train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.max_steps=1"), overwrite=True)
    assert (out / "adapter_model.safetensors").exists() and not (out / LOCK_NAME).exists()


def test_lock_in_process(tmp_path):
    out = tmp_path / "new" / "run"
    held = acquire(out)
    assert (out / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on host ")
    with pytest.raises(LockedError, match=f"pid {os.getpid()} "):
        acquire(out)  # flock: a second open file description conflicts, even in this process
    held.release()
    with acquire(out):
        pass
    assert not out.exists()  # created for the run and left empty: removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception) as e:
        acquire(tmp_path / "file")
    assert "is not a directory" in str(e.value)


# -----------------------------------------------------------------------------
# torchrun: a signal that reaches one rank stops every rank after the same step
#
# Every wait below is for something the run shows (a step in metrics.jsonl, torchrun's worker
# process, the exit), with deadlines far above the ~20 s this takes on an idle machine: niced on
# two cores shared with other jobs, starting torchrun and two ranks that import torch can take
# minutes. The output goes to a file, not a pipe nobody reads while waiting (a full pipe would stall
# the run), and whatever happens the run's processes are gone when the test ends.

START_S = 900  # until step 2 is logged (idle machine: ~15 s)
STOP_S = 600  # from the signal until torchrun has exited (idle machine: ~5 s)


def tagged_pids(tag, *env_items, parent=None):
    """Processes whose environment holds ``tag`` and every KEY=VALUE of ``env_items`` (and whose
    parent is ``parent``, if given): a run's processes, found even after their launcher died."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
                ppid = int(open(f"/proc/{d}/stat", "rb").read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                continue
            if all(item.encode() in env for item in (tag, *env_items)) and parent in (None, ppid):
                found.append(int(d))
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks through /proc")
def test_sigterm_to_one_torchrun_rank_stops_all_after_the_same_step(tmp_path, tiny_model_dir):
    out, log_path = tmp_path / "run", tmp_path / "torchrun.log"
    tag = f"PHILORA_TEST_TAG={os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PHILORA_TEST_TAG=tag.split("=", 1)[1])
    args = [f"model.name_or_path={tiny_model_dir}", f"training_config.output_dir={out}", "data.max_length=128",
            "training_config.max_steps=100000", "training_config.per_device_train_batch_size=2",
            "training_config.logging_steps=1", "training_config.eval_steps=0", "training_config.save_steps=0",
            "training_config.eval_max_samples=2", "training_config.report_samples=0",
            "training_config.progress_bar=false"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                 "2", "-m", "philora", "train", *args], env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(proc, lambda: len(logged_steps(out)) >= 2, "step 2", timeout=START_S, log=log_path, every=0.1)
        rank1 = []

        def rank1_found():  # torchrun's own worker (its child), not a process that worker may have started
            rank1[:] = tagged_pids(tag, "RANK=1", parent=proc.pid)
            return rank1
        wait_for(proc, rank1_found, "torchrun's rank-1 worker", log=log_path, every=0.1)
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGTERM)  # rank 1 only: rank 0 learns of it through the step's all-reduce
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun still running {STOP_S} s after the signal: {tail(log_path)}") from None
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun stops its workers
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in tagged_pids(tag):  # workers a killed torchrun left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    log = log_path.read_text()
    step = logged_steps(out)[-1]
    stopped = [ln for ln in log.splitlines() if "stopped after step" in ln]
    assert len(stopped) == 2, log[-3000:]  # both ranks, the same line
    assert all(ln.endswith(f"philora: SIGTERM: stopped after step {step} with a checkpoint in "
                           f"{out / f'checkpoint-{step}'}; continue with the same command and --resume")
               for ln in stopped), stopped
    # The workers print no traceback; torchrun prints its own report of workers that exited 143.
    assert log.count("Traceback") == 1 and "ChildFailedError" in log.split("Traceback")[1], log[-3000:]
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step}"]
    read_verified(out / f"checkpoint-{step}")
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["step"] == step and state["world_size"] == 2
