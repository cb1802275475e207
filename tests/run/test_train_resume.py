"""philora.run.train: exact resume after a kill (in a step or while saving a checkpoint), and what
happens to an existing run directory (refused, kept, never deleted by a run that cannot start).

Runs use a small GQA Phi-3 with the tiny model's tokenizer and chat template (conftest).
"""

import dataclasses
import shutil

import pytest
import torch
from safetensors.torch import load_file

from philora.run import checkpoint
from philora.run.checkpoint import list_checkpoints
from philora.core.errors import PhiloraError
from philora.run.train import train


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -----------------------------------------------------------------------------
# an existing run directory


def test_existing_run_is_refused_and_kept(tmp_path, small_model_dir, small_data, helpers):
    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / "metrics.jsonl").write_text("{}\n")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(out, small_model_dir, small_data))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "--resume" in msg and "--overwrite" in msg
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_resume_without_a_checkpoint_is_an_error(tmp_path, small_model_dir, small_data, helpers):
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(tmp_path / "empty", small_model_dir, small_data), resume=True)
    assert "\n" not in str(e.value) and "empty" in str(e.value)


def test_a_bad_setting_is_caught_before_overwrite_deletes(tmp_path, small_model_dir, small_data, helpers):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    cfg = helpers.make_cfg(out, small_model_dir, small_data)  # valid on load, then changed in code
    cfg = dataclasses.replace(cfg, training_config=dataclasses.replace(cfg.training_config,
                                                                       gradient_accumulation_steps=0))
    with pytest.raises(PhiloraError) as e:
        train(cfg, overwrite=True)
    assert "gradient_accumulation_steps" in str(e.value)
    assert (out / "metrics.jsonl").exists()


# -----------------------------------------------------------------------------
# resume


RESUME = ["training_config.max_steps=6", "training_config.save_steps=2", "training_config.save_total_limit=2",
          "peft_config.lora_dropout=0.2", "training_config.eval_steps=3"]


@pytest.fixture(scope="module")
def full_run(small_model_dir, small_data, tmp_path_factory, helpers):
    out = tmp_path_factory.mktemp("full") / "run"
    train(helpers.make_cfg(out, small_model_dir, small_data, *RESUME))
    return out


def test_resume_after_a_kill_is_bit_identical(tmp_path, small_model_dir, small_data, full_run, recorder, helpers):
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, *RESUME)
    recorder.kill_at = 6  # steps 1-5 done (checkpoints 2 and 4), killed during step 6
    with pytest.raises(helpers.Killed):
        train(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "adapter_model.safetensors").exists()
    recorder.kill_at = None
    train(cfg, resume=True)
    assert_same_tensors(helpers.adapter_tensors(out), helpers.adapter_tensors(full_run))
    assert_same_tensors(load_file(str(out / "checkpoint-6" / "lora.safetensors")),
                        load_file(str(full_run / "checkpoint-6" / "lora.safetensors")))
    # metrics.jsonl continues the killed run: each step once, the same values as uninterrupted
    assert helpers.timeless_records(out) == helpers.timeless_records(full_run)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, small_model_dir, small_data, full_run,
                                                        monkeypatch, helpers):
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, *RESUME, "training_config.save_total_limit=1")
    calls = []
    real = checkpoint.rng_state

    def dying_rng_state():
        calls.append(1)
        if len(calls) == 2:  # the save at step 4, after LoRA, optimizer and scheduler were written
            raise helpers.Killed("killed while saving")
        return real()
    monkeypatch.setattr(checkpoint, "rng_state", dying_rng_state)
    with pytest.raises(helpers.Killed):
        train(cfg)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert {p.name for p in (out / "checkpoint-2").iterdir()} == helpers.CKPT_FILES
    train(cfg, resume=True)  # the earlier checkpoint loads, and the run ends as if never killed
    assert_same_tensors(helpers.adapter_tensors(out), helpers.adapter_tensors(full_run))


def test_resume_with_another_lora_config_is_a_one_line_error(tmp_path, small_model_dir, small_data, full_run, helpers):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    cfg = helpers.make_cfg(out, small_model_dir, small_data, *RESUME, "peft_config.r=2")
    with pytest.raises(PhiloraError) as e:
        train(cfg, resume=True)
    assert "\n" not in str(e.value) and "checkpoint-6" in str(e.value)
