"""Damaged checkpoints: every file checked against the manifest before any tensor is used.

Each checkpoint file in turn gets one byte changed (same size: a header that still parses), is cut
short, or is removed: resume reports it in one line and falls back to the previous checkpoint, or,
with none, stops with a one-line error. A pickle that is not plain data, or non-finite tensors,
are refused even with a manifest forged to match. End to end, a run whose newer checkpoints are
damaged resumes from the last good one and ends as if never interrupted.
"""

import hashlib
import json
import shutil

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from philora.run.checkpoint import (MANIFEST, CheckpointError, find_resumable, load_checkpoint, read_verified,
                                save_checkpoint)
from philora.core.config import PeftConfig
from philora.model.inject import inject_lora
from philora.lora import lora_state_dict
from philora.run.metrics import read_metrics
from philora.run.train import train

FILES = ["lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.yaml",
         MANIFEST]


def make(lora_seed=0):
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        original_max_position_embeddings=32, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    torch.manual_seed(lora_seed)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def step(model, opt, sched, seed):
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))
    model(ids, labels=ids).loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


@pytest.fixture
def two_checkpoints(tmp_path):
    model, opt, sched = make()
    for s in (1, 2):
        step(model, opt, sched, s)
        # an older checkpoint's scheduler.pt (a LambdaLR state dict): verified, read, not needed
        save_checkpoint(tmp_path, s, model, opt, sched.state_dict(), {"step": s, "samples_seen": 2 * s}, "training_config: {}\n")
    return tmp_path, {k: v.clone() for k, v in lora_state_dict(model).items()}


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size; for safetensors/.pt zip: the header still parses
    path.write_bytes(bytes(data))


def forge_manifest(ckpt):
    """What someone rewriting a file and its checksum would do: the manifest matches again."""
    m = json.loads((ckpt / MANIFEST).read_text())
    for name, entry in m["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (ckpt / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_file_is_named_and_the_previous_checkpoint_used(two_checkpoints, helpers, name, damage):
    out, _ = two_checkpoints
    target = out / "checkpoint-2" / name
    if damage == "flip":
        flip_byte(target)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:
        target.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out / "checkpoint-2", *make(lora_seed=5)[:2])
    helpers.one_line_error(e, str(out / "checkpoint-2"), name)
    said = []
    assert find_resumable(out, log=said.append) == out / "checkpoint-1"
    assert len(said) == 1 and "\n" not in said[0] and name in said[0] and "checkpoint-1 instead" in said[0]
    state = load_checkpoint(out / "checkpoint-1", *make(lora_seed=5)[:2])
    assert state["step"] == 1
    # With no older checkpoint left: a one-line error, nothing loaded.
    shutil.rmtree(out / "checkpoint-1")
    with pytest.raises(CheckpointError) as e:
        find_resumable(out)
    helpers.one_line_error(e, "no usable checkpoint", name)


def test_an_intact_checkpoint_loads_exactly(two_checkpoints):
    out, expected = two_checkpoints
    model, opt, sched = make(lora_seed=5)
    assert load_checkpoint(out / "checkpoint-2", model, opt)["step"] == 2
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, expected[k]), k
    assert set(read_verified(out / "checkpoint-2")) == set(FILES) - {MANIFEST}


def test_a_pickle_that_is_not_plain_data_is_refused_even_with_a_forged_manifest(two_checkpoints, tmp_path, helpers):
    out, _ = two_checkpoints
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, out / "checkpoint-2" / "optimizer.pt")
    forge_manifest(out / "checkpoint-2")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out / "checkpoint-2", *make()[:2])
    helpers.one_line_error(e, "checkpoint-2", "cannot restore the training state")
    assert not marker.exists()  # never unpickled


def test_non_finite_tensors_are_refused_even_with_a_forged_manifest(two_checkpoints, helpers):
    from safetensors.torch import load_file, save_file
    out, _ = two_checkpoints
    path = out / "checkpoint-2" / "lora.safetensors"
    tensors = load_file(str(path))
    first = sorted(tensors)[0]
    tensors[first][0] = float("nan")
    save_file(tensors, str(path))
    forge_manifest(out / "checkpoint-2")
    model, opt, sched = make(lora_seed=5)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(out / "checkpoint-2", model, opt)
    helpers.one_line_error(e, "checkpoint-2", first, "NaN")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, before[k])  # nothing was loaded


def test_non_finite_state_is_never_written(tmp_path, helpers):
    model, opt, sched = make()
    step(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, model, opt, sched.state_dict(), {"step": 1}, "")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0] = float("inf")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path, 2, model, opt, sched.state_dict(), {"step": 2}, "")
    helpers.one_line_error(e, "checkpoint-2", "NaN or infinite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]


# -----------------------------------------------------------------------------
# end to end

RUN = ["training_config.max_steps=6", "training_config.save_steps=2", "training_config.save_total_limit=0",
       "peft_config.lora_dropout=0.2", "training_config.eval_steps=3"]


def test_resume_skips_damaged_checkpoints_and_ends_as_uninterrupted(tmp_path, small_model_dir, small_data, helpers,
                                                                    capsys):
    whole = tmp_path / "whole"
    train(helpers.make_cfg(whole, small_model_dir, small_data, *RUN))
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    for p in ("adapter_model.safetensors", "adapter_config.json"):  # as if killed after the last checkpoint
        (out / p).unlink()
    flip_byte(out / "checkpoint-6" / "optimizer.pt")
    flip_byte(out / "checkpoint-4" / "lora.safetensors")
    capsys.readouterr()
    train(helpers.make_cfg(out, small_model_dir, small_data, *RUN), resume=True)
    printed = capsys.readouterr().out
    assert "checkpoint-6: optimizer.pt is damaged" in printed and "checkpoint-4: lora.safetensors is damaged" in printed
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in printed
    a, b = helpers.adapter_tensors(out), helpers.adapter_tensors(whole)
    for k in b:
        assert torch.equal(a[k], b[k]), k
    timeless = lambda d: [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")}  # noqa: E731
                          for r in read_metrics(d)]
    assert timeless(out) == timeless(whole)  # each step and eval once, the final eval included
    read_verified(out / "checkpoint-6")  # rewritten whole
