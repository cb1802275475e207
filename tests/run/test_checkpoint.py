"""philora.run.checkpoint: exact save/load of LoRA, optimizer and RNG (the learning rate follows the
step: schedule.get_lr); atomic writes; rotation."""

import json
import random

import pytest
import torch
from torch.testing import assert_close
from transformers import Phi3Config, Phi3ForCausalLM

from philora.core.config import PeftConfig
from philora.run import checkpoint
from philora.run.schedule import Schedule
from philora.run.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from philora.core.errors import PhiloraError
from philora.model.inject import inject_lora
from philora.lora import lora_state_dict


def make(r=4, targets="all-linear", lora_seed=0):
    """The same base model every time (it is not in checkpoints); LoRA init from ``lora_seed``."""
    config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        original_max_position_embeddings=32, pad_token_id=0)
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    torch.manual_seed(lora_seed)
    inject_lora(model, PeftConfig(r=r, lora_alpha=2 * r, lora_dropout=0.1, target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    return model, opt, Schedule("cosine", (1e-2,), 2, 8)


def train_steps(model, opt, sched, n, seed=1, start=None):
    """``n`` steps from step ``start`` (default: as many as ``opt`` has taken), at the schedule's rates."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    first = start if start is not None else getattr(opt, "steps_taken", 0)
    for step in range(first, first + n):
        sched.apply(opt, step)
        ids = torch.randint(0, 64, (2, 7), generator=g)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    opt.steps_taken = first + n


def save(tmp_path, step, model, opt, sched, limit=0):
    return save_checkpoint(tmp_path, step, model, opt, sched.record(step), {"step": step, "samples_seen": 4 * step},
                           "training_config: {}\n", limit)


def test_round_trip_is_exact(tmp_path):
    model, opt, sched = make()
    train_steps(model, opt, sched, 3)
    random.seed(5)
    path = save(tmp_path, 3, model, opt, sched)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json", "config.yaml",
         "manifest.json"])
    # what comes next in the saved process
    expected_rand, expected_py = torch.rand(5), random.random()
    train_steps(model, opt, sched, 2, seed=7)
    expected = {k: v.clone() for k, v in lora_state_dict(model).items()}

    torch.manual_seed(123)
    random.seed(123)
    fresh, fopt, fsched = make(lora_seed=9)  # different init: everything must come from the checkpoint
    state = load_checkpoint(path, fresh, fopt)
    assert state == {"step": 3, "samples_seen": 12}
    assert_close(torch.rand(5), expected_rand, rtol=0, atol=0)
    assert random.random() == expected_py
    assert torch.load(path / "scheduler.pt", weights_only=True)["lrs"] == sched.lrs(3)
    train_steps(fresh, fopt, fsched, 2, seed=7, start=state["step"])  # the rate from the step
    got = lora_state_dict(fresh)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert [g["lr"] for g in fopt.param_groups] == [g["lr"] for g in opt.param_groups]


def test_rotation_keeps_the_newest(tmp_path):
    model, opt, sched = make()
    for step in (5, 10, 15, 20):
        save(tmp_path, step, model, opt, sched, limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    assert not (tmp_path / "checkpoint-5").exists() and not (tmp_path / "checkpoint-10").exists()
    save(tmp_path, 25, model, opt, sched, limit=0)  # 0: keep all
    assert len(list_checkpoints(tmp_path)) == 3


def test_listing_is_numeric_and_skips_incomplete(tmp_path):
    model, opt, sched = make()
    for step in (9, 10, 100):
        save(tmp_path, step, model, opt, sched)
    (tmp_path / "checkpoint-200").mkdir()  # no trainer_state.json: incomplete
    (tmp_path / ".checkpoint-300.tmp").mkdir()
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert latest_checkpoint(tmp_path).name == "checkpoint-100"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = make()
    train_steps(model, opt, sched, 1)
    save(tmp_path, 1, model, opt, sched, limit=1)
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train_steps(model, opt, sched, 1)

    def killed():
        raise KeyboardInterrupt  # mid-way: LoRA, optimizer and scheduler are already written
    monkeypatch.setattr(checkpoint, "rng_state", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, opt, sched, limit=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # no partial dir, nothing rotated
    monkeypatch.undo()
    fresh, fopt, fsched = make(lora_seed=3)
    assert load_checkpoint(tmp_path / "checkpoint-1", fresh, fopt)["step"] == 1
    for k, v in lora_state_dict(fresh).items():
        assert torch.equal(v, before[k])


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt, sched = make()
    save(tmp_path, 4, model, opt, sched)
    train_steps(model, opt, sched, 1)
    save(tmp_path, 4, model, opt, sched)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-4"]
    fresh, fopt, fsched = make(lora_seed=3)
    load_checkpoint(tmp_path / "checkpoint-4", fresh, fopt)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)


def test_files_are_plain_data(tmp_path):
    model, opt, sched = make()
    train_steps(model, opt, sched, 1)
    path = save(tmp_path, 1, model, opt, sched)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # no arbitrary pickles needed
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 1, "samples_seen": 4}
    assert (path / "config.yaml").read_text() == "training_config: {}\n"


@pytest.mark.parametrize("saved, loading", [
    (dict(r=4), dict(r=2)),  # another rank: shapes differ
    (dict(), dict(targets=["o_proj"])),  # the checkpoint has tensors the model lacks
    (dict(targets=["o_proj"]), dict()),  # the model has LoRA tensors the checkpoint lacks
])
def test_checkpoint_of_another_lora_config_is_a_one_line_error(tmp_path, saved, loading):
    model, opt, sched = make(**saved)
    path = save(tmp_path, 1, model, opt, sched)
    fresh, fopt, fsched = make(**loading)
    with pytest.raises(PhiloraError) as e:
        load_checkpoint(path, fresh, fopt)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg


def test_trained_biases_are_checkpointed(tmp_path):
    """peft_config.bias all / lora_only trains biases: a resume must restore them too."""
    def biased(lora_seed=0):
        config = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                            original_max_position_embeddings=32, pad_token_id=0)
        torch.manual_seed(0)
        model = Phi3ForCausalLM(config)
        model.model.layers[0].self_attn.o_proj = torch.nn.Linear(32, 32, bias=True)
        torch.manual_seed(lora_seed)
        inject_lora(model, PeftConfig(r=2, lora_alpha=4, target_modules=["o_proj"], bias="all", lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, Schedule("constant", (1e-2,), 0, 8)

    model, opt, sched = biased()
    bias0 = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    train_steps(model, opt, sched, 2)
    trained = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    assert not torch.equal(trained, bias0)
    path = save(tmp_path, 2, model, opt, sched)
    fresh, fopt, fsched = biased(lora_seed=1)
    load_checkpoint(path, fresh, fopt)
    assert torch.equal(fresh.model.layers[0].self_attn.o_proj.bias, trained)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)
