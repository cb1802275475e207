"""Full disks, read-only file systems, missing permissions: one line that says so, every earlier file intact.

Writers that fail are simulated (a file object whose writes raise ENOSPC/EROFS, a library writer
that dies half-way) and, where this process may mount one (root), met for real on a small tmpfs:
a training run that fills it, a resume on it read-only, a merge into it.
"""

import errno
import hashlib
import os
import shutil
import subprocess
import uuid

import pytest
import torch

from philora.run import checkpoint
from philora.core import diskio
from philora.run import train as train_mod
from philora.run.checkpoint import list_checkpoints, read_verified, save_checkpoint
from philora.cli import describe_os_error, main
from philora.core.diskio import TEMP_PREFIX, WriteError, staged, write_bytes, write_error
from philora.core.errors import PhiloraError
from philora.run.metrics import RunLogger, read_metrics
from philora.run.train import train

NO_SPACE = os.strerror(errno.ENOSPC)


class FailingFile:
    """A binary file whose writes fail with ``code`` after ``budget`` bytes."""

    def __init__(self, f, code, budget=0):
        self.f, self.code, self.budget = f, code, budget

    def write(self, data):
        if len(data) > self.budget:
            self.f.write(data[:self.budget])
            raise OSError(self.code, os.strerror(self.code))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def files(d):
    """{relative path: sha256} of everything under ``d``."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(d):
    return [p.name for p in d.rglob("*") if p.name.startswith((TEMP_PREFIX, ".checkpoint-", ".old-checkpoint-"))]


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "the disk is full"), (errno.EDQUOT, "quota"), (errno.EROFS, "read-only"),
    (errno.EACCES, "no permission")])
def test_write_errors_say_what_happened(tmp_path, code, words, helpers):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    real = os.fdopen
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diskio.os, "fdopen", lambda fd, mode: FailingFile(real(fd, mode), code, budget=3))
        with pytest.raises(WriteError) as e:
            write_bytes(target, b"new contents")
    helpers.one_line_error(e, str(target), os.strerror(code), words)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_library_errors_that_wrap_a_full_disk_are_named(tmp_path):
    rust = RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    assert str(write_error(tmp_path / "x", rust)) == f"cannot write '{tmp_path / 'x'}': {NO_SPACE} (the disk is full: free some space)"
    assert "boom" in str(write_error(tmp_path / "x", RuntimeError("boom\nmore")))  # not a disk problem: as it is
    e = OSError(errno.ENOSPC, NO_SPACE, "/data/out.jsonl")
    assert describe_os_error(e) == f"'/data/out.jsonl': {NO_SPACE} (the disk is full: free some space)"


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, helpers, monkeypatch):
    model = helpers.lora_phi3()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(tmp_path, 1, model, opt, sched.state_dict(), {"step": 1}, "")
    before = files(tmp_path)
    written = []

    def nearly_full(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        written.append(path)
        return FailingFile(f, errno.ENOSPC, budget=1000) if len(written) == 3 else f  # the 3rd file
    monkeypatch.setattr(checkpoint, "open", nearly_full, raising=False)
    with pytest.raises(WriteError) as e:
        save_checkpoint(tmp_path, 2, model, opt, sched.state_dict(), {"step": 2}, "", save_total_limit=1)
    helpers.one_line_error(e, str(tmp_path / "checkpoint-2"), NO_SPACE, "the disk is full")
    assert files(tmp_path) == before and not leftovers(tmp_path)  # nothing rotated, no temp dir
    read_verified(tmp_path / "checkpoint-1")


def test_staged_writes_leave_the_directory_as_it_was(tmp_path, helpers):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous model")
    before = files(out)
    with pytest.raises(WriteError) as e:
        with staged(out) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / "model.safetensors").write_bytes(b"half")
            raise RuntimeError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    helpers.one_line_error(e, str(out / "model.safetensors"), NO_SPACE)
    assert files(out) == before and not leftovers(out)
    with pytest.raises(ValueError, match="a bug"):  # not a write failure: raised as it is, still cleaned
        with staged(out):
            raise ValueError("a bug")
    assert files(out) == before and not leftovers(out)
    with staged(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"new model")
    assert (out / "model.safetensors").read_bytes() == b"new model" and not leftovers(out)


def test_metrics_write_failure_is_one_line(tmp_path, helpers):
    logger = RunLogger(tmp_path, 10, progress_bar=False)
    logger.write({"step": 1, "loss": 1.0})
    logger.jsonl = FailingFile(logger.jsonl, errno.ENOSPC)
    with pytest.raises(WriteError) as e:
        logger.write({"step": 2, "loss": 1.0})
    helpers.one_line_error(e, "metrics.jsonl", NO_SPACE)


def test_full_disk_while_saving_the_adapter(tmp_path, small_model_dir, small_data, helpers, monkeypatch):
    real = train_mod.save_adapter

    def dies_half_way(model, out_dir, *a, **k):
        real(model, out_dir, *a, **k)
        (out_dir / "adapter_model.safetensors").write_bytes(b"cut short")
        raise OSError(errno.ENOSPC, NO_SPACE)
    monkeypatch.setattr(train_mod, "save_adapter", dies_half_way)
    out = tmp_path / "run"
    with pytest.raises(WriteError) as e:
        train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.save_steps=4"))
    helpers.one_line_error(e, str(out), NO_SPACE)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert not leftovers(out)
    read_verified(out / "checkpoint-4")  # the work is kept: --resume redoes only the saving


def test_merge_onto_a_full_disk_keeps_the_previous_output(base_dir, tmp_path, helpers, monkeypatch, capsys):
    helpers.make_run(tmp_path / "run", base_dir)
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "run"), "--out", str(out)]) == 0
    before = files(out)
    from transformers import PreTrainedModel
    real = PreTrainedModel.save_pretrained

    def dies_half_way(self, path, *a, **k):
        real(self, path, *a, **k)
        raise OSError(errno.ENOSPC, NO_SPACE)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_half_way)
    code, line = helpers.run_cli(capsys, "merge", tmp_path / "run", "--out", out, "--force")
    assert code == 2 and NO_SPACE in line and str(out) in line, line
    assert files(out) == before and not leftovers(out)


# -----------------------------------------------------------------------------
# a real small file system (root only)


@pytest.fixture
def small_fs(tmp_path):
    """A 1.5 MiB tmpfs mounted at tmp_path/fs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    name = f"philora-test-{uuid.uuid4().hex[:8]}"
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", name, str(mnt)], capture_output=True)
    except OSError:
        pytest.skip("no mount command")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def remount(mnt, options):
    subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True, capture_output=True)


def test_a_run_that_fills_a_real_disk(small_fs, tmp_path, small_model_dir, small_data, helpers, capsys):
    out = small_fs / "run"
    args = ["training_config.max_steps=400", "training_config.save_steps=1", "training_config.save_total_limit=0"]
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(out, small_model_dir, small_data, *args))
    helpers.one_line_error(e, str(out), NO_SPACE)
    ckpts = list_checkpoints(out)
    assert len(ckpts) >= 2, ckpts
    for ckpt in ckpts:
        read_verified(ckpt)  # every checkpoint there is whole
    assert not leftovers(out)
    # Read-only (e.g. a quota or a remount): --resume says so in one line, changes nothing.
    before = files(out)
    remount(small_fs, "ro")
    code, line = helpers.run_cli(capsys, "train", *helpers.make_args(out, small_model_dir, small_data, *args), "--resume")
    assert code != 0 and os.strerror(errno.EROFS) in line and str(out) in line, line
    remount(small_fs, "rw,size=64m")
    assert files(out) == before
    # With space again the run resumes from its last checkpoint and (shortened) finishes.
    last = int(ckpts[-1].name.split("-")[1])
    train(helpers.make_cfg(out, small_model_dir, small_data, *args, f"training_config.max_steps={last + 1}"),
          resume=True)
    assert (out / "adapter_model.safetensors").exists()


def test_merge_into_a_full_real_disk(small_fs, base_dir, tmp_path, helpers, capsys):
    helpers.make_run(tmp_path / "run", base_dir)
    (small_fs / "filler").write_bytes(b"\0" * 1_400_000)
    code, line = helpers.run_cli(capsys, "merge", tmp_path / "run", "--out", small_fs / "merged")
    assert code == 2 and NO_SPACE in line, line
    assert not leftovers(small_fs) and not any((small_fs / "merged").iterdir())
    shutil.rmtree(small_fs / "merged")


def test_tensorboard_write_failure_is_one_warning_and_the_run_logs_on(tmp_path, monkeypatch, capfd):
    from tensorboard.compat.tensorflow_stub.io import gfile
    logger = RunLogger(tmp_path, 10, progress_bar=False)
    logger.write({"step": 1, "loss": 1.0})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, NO_SPACE)
    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    for step in range(2, 6):
        logger.write({"step": step, "loss": 1.0})
    logger.close()
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception in thread" not in out + err
    assert [line for line in out.splitlines() if "TensorBoard" in line] == [
        f"philora: warning: TensorBoard logging stopped: cannot write '{tmp_path / 'tensorboard'}': {NO_SPACE} "
        f"(the disk is full: free some space)"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
