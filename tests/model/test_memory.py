"""memory.py: ``model.gradient_checkpointing: auto`` measures activations per token with a probe,
turns checkpointing on exactly when the longest micro-batch would not fit, and a run with it on
trains what a run without it trains."""

import json

import pytest
import torch

from philora.model import attention
from philora.model import memory
from philora.data.batching import collate
from philora.core.config import ConfigError, load_config
from philora.model.loss import CausalLMLoss
from philora.run.train import train


def test_saved_bytes_counts_what_backward_keeps():
    x = torch.randn(100, requires_grad=True)
    w = torch.randn(100)
    assert memory.saved_bytes(lambda: x.exp()) == 400  # exp keeps its output
    assert memory.saved_bytes(lambda: x * w) == 400  # the frozen factor w, for x's gradient
    assert memory.saved_bytes(lambda: x * w, exclude=[w]) == 0
    assert memory.saved_bytes(lambda: (x * 2).sum()) == 0  # nothing: no tensor needed


def test_longest_micro_batch():
    assert memory.longest_micro_batch([5, 3, 9, 1], 2) == 14
    assert memory.longest_micro_batch([5], 4) == 5


def packed(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ex = [{"input_ids": torch.randint(3, 128, (n,), generator=g).tolist()} for n in lengths]
    for e in ex:
        e["labels"] = list(e["input_ids"])
    b = collate(ex, 0, True, 10 ** 9)
    return {k: b[k] for k in ("input_ids", "labels", "position_ids")}


def test_probe_per_token_extrapolates_to_long_batches(helpers):
    model = helpers.lora_phi3(attn_implementation=attention.register()).train()
    loss_fn = CausalLMLoss(model)
    params = list(model.parameters())
    small = memory.saved_bytes(lambda: loss_fn(packed([32])), params) / 32
    large = memory.saved_bytes(lambda: loss_fn(packed([60, 60, 60])), params) / 180
    assert large == pytest.approx(small, rel=0.15)  # per-conversation attention: linear in tokens


def test_decide_compares_the_need_with_the_free_memory(helpers):
    model = helpers.lora_phi3(attn_implementation=attention.register()).train()
    loss_fn = CausalLMLoss(model)
    probe = packed([32])
    on, line = memory.decide(loss_fn, probe, 10_000, torch.device("cpu"), 128, 4096, free=2 ** 20)
    assert on and "checkpointing on" in line and "10000 tokens" in line
    on, line = memory.decide(loss_fn, probe, 10_000, torch.device("cpu"), 128, 4096, free=2 ** 40)
    assert not on and "checkpointing off" in line


def test_config_accepts_auto_only():
    assert load_config(None, ["model.gradient_checkpointing=auto"]).model.gradient_checkpointing == "auto"
    assert load_config(None, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="model.gradient_checkpointing"):
        load_config(None, ["model.gradient_checkpointing=sometimes"])


def checkpointing(model):
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_auto_run_with_a_small_budget_checkpoints_and_trains_the_same(tmp_path, small_model_dir, small_data,
                                                                      helpers, monkeypatch, capsys):
    args = ("training_config.max_steps=2", "training_config.eval_steps=0", "data.eval=null",
            "data.eval_fraction=0", "peft_config.lora_dropout=0.0")
    plain = train(helpers.make_cfg(tmp_path / "plain", small_model_dir, small_data, *args))
    assert not checkpointing(plain.model)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 ** 40)  # plenty: stays off
    roomy = train(helpers.make_cfg(tmp_path / "roomy", small_model_dir, small_data, *args,
                                   "model.gradient_checkpointing=auto"))
    assert not checkpointing(roomy.model) and "checkpointing off" in capsys.readouterr().out
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 ** 16)  # 64 KiB: must checkpoint
    tight = train(helpers.make_cfg(tmp_path / "tight", small_model_dir, small_data, *args,
                                   "model.gradient_checkpointing=auto"))
    assert checkpointing(tight.model) and "checkpointing on" in capsys.readouterr().out
    # Recomputing activations changes nothing that is trained.
    assert losses(tmp_path / "tight") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert losses(tmp_path / "roomy") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    for name, p in plain.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(dict(tight.model.named_parameters())[name], p, **helpers.TIGHT)
