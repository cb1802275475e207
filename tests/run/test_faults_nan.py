"""Non-finite training: a NaN/inf loss or gradient norm skips the step (no update) with a warning;
training_config.max_bad_steps in a row stop the run with one line; nothing non-finite is saved.
"""

import math

import pytest
import torch

from philora.run import objective as objective_mod
from philora.run.checkpoint import list_checkpoints, load_checkpoint, read_verified
from philora.core.config import ConfigError, PeftConfig, load_config
from philora.core.errors import PhiloraError
from philora.run.metrics import read_metrics
from philora.run.train import save_final_adapter, train


def test_a_config_that_diverges_stops_with_one_line_and_saves_nothing_non_finite(tmp_path, small_model_dir,
                                                                                 small_data, helpers, capsys):
    """learning_rate 1e30 (accepted: > 0) blows the weights up within a few steps: the loss turns
    NaN, each such step is skipped, and 3 in a row stop the run."""
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, "training_config.learning_rate=1e30",
                           "training_config.max_steps=20", "training_config.save_steps=1", "training_config.save_total_limit=0",
                           "training_config.max_bad_steps=3", "training_config.warmup_steps=0")
    with pytest.raises(PhiloraError) as e:
        train(cfg)
    records = [r for r in read_metrics(out) if "lr" in r]
    first_bad = next(r["step"] for r in records if r.get("skipped_steps"))
    assert first_bad > 1 and all(math.isfinite(r["loss"]) for r in records if r["step"] < first_bad)
    helpers.one_line_error(e, f"training stopped at step {first_bad + 2}", "3 step(s) in a row", "NaN",
                           "max_bad_steps=3", f"last updated at step {first_bad - 1}", "learning_rate")
    warnings = [line for line in capsys.readouterr().out.splitlines() if "update was skipped" in line]
    assert [w.split(":")[2].strip() for w in warnings] == [f"step {first_bad}", f"step {first_bad + 1}"]
    assert not (out / "adapter_model.safetensors").exists()
    assert [r["step"] for r in records] == list(range(1, first_bad + 2))  # the stopping step is not logged
    for r in records[first_bad - 1:]:
        assert r["loss"] is None and r["skipped_steps"] == 1
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in range(1, first_bad + 2)]
    for ckpt in list_checkpoints(out):  # every checkpoint loads: finite, verified
        read_verified(ckpt)
    model = helpers.load_model(small_model_dir)
    from philora.model.inject import inject_lora
    inject_lora(model, cfg.peft_config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    load_checkpoint(list_checkpoints(out)[-1], model, opt)


def test_one_bad_step_is_skipped_and_training_goes_on(tmp_path, small_model_dir, small_data, helpers, recorder,
                                                      monkeypatch, capsys):
    calls = []

    class FlakyLoss(objective_mod.CausalLMLoss):
        def forward(self, batch):
            loss_sum, n = super().forward(batch)
            if self.training:
                calls.append(1)
                if len(calls) == 2:  # step 2's loss is NaN
                    loss_sum = loss_sum * float("nan")
            return loss_sum, n
    monkeypatch.setattr(objective_mod, "CausalLMLoss", FlakyLoss)
    out = tmp_path / "run"
    result = train(helpers.make_cfg(out, small_model_dir, small_data, "training_config.max_bad_steps=2"))
    assert len(recorder.steps) == 3  # 4 steps, one without an update
    assert math.isfinite(result.metrics["eval_loss"])
    for v in helpers.adapter_tensors(out).values():
        assert torch.isfinite(v).all()
    records = [r for r in read_metrics(out) if "lr" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] is None and records[1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in records if r["step"] != 2)
    assert "step 2: NaN or infinite loss or gradient norm; the update was skipped (1 in a row" in capsys.readouterr().out


def test_max_bad_steps_one_stops_at_the_first(tmp_path, small_model_dir, small_data, helpers, monkeypatch):
    class NaNLoss(objective_mod.CausalLMLoss):
        def forward(self, batch):
            loss_sum, n = super().forward(batch)
            return (loss_sum * float("nan") if self.training else loss_sum), n
    monkeypatch.setattr(objective_mod, "CausalLMLoss", NaNLoss)
    with pytest.raises(PhiloraError) as e:
        train(helpers.make_cfg(tmp_path / "run", small_model_dir, small_data, "training_config.max_bad_steps=1"))
    helpers.one_line_error(e, "training stopped at step 1", "last updated at step 0")


def test_config_ranges_reject_values_that_cannot_train():
    for item, needle in [("training_config.adam_epsilon=0", "adam_epsilon"),
                         ("training_config.max_bad_steps=0", "max_bad_steps"),
                         ("training_config.learning_rate=0", "learning_rate")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, [item])


def test_a_non_finite_adapter_is_never_written(tmp_path, helpers):
    model = helpers.lora_phi3()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = float("nan")
    with pytest.raises(PhiloraError) as e:
        save_final_adapter(model, None, tmp_path, "base", PeftConfig())
    helpers.one_line_error(e, "NaN or infinite", "not saved")
    assert not any(tmp_path.iterdir())
