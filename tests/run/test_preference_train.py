"""philora.run.train with a preference objective: the same loop, exact resume (the reference
log-probs read back from the run), metrics, SFT -> DPO on one adapter, and bad input caught
before the model loads."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from philora.core.errors import PhiloraError
from philora.data.preference import SAMPLE_EVAL, SAMPLE_TRAIN
from philora.run.checkpoint import list_checkpoints
from philora.run.metrics import read_metrics
from philora.run.train import train

PAIR_RUN = ["training_config.objective=dpo", "training_config.beta=0.1", "training_config.max_steps=6",
            "training_config.save_steps=2", "training_config.eval_steps=3", "training_config.save_total_limit=2",
            "training_config.per_device_train_batch_size=2", "peft_config.lora_dropout=0.0"]


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    (d / "train.jsonl").write_text("\n".join(SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[:16]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(SAMPLE_EVAL.read_text(encoding="utf-8").splitlines()[:6]) + "\n")
    return d / "train.jsonl", d / "eval.jsonl"


@pytest.fixture(scope="module")
def dpo_run(small_model_dir, pair_data, tmp_path_factory, helpers):
    out = tmp_path_factory.mktemp("dpo") / "run"
    train(helpers.make_cfg(out, small_model_dir, pair_data, *PAIR_RUN))
    return out


def test_dpo_run_logs_trl_metrics_and_saves_a_peft_adapter(dpo_run, small_model_dir, helpers):
    recs = helpers.timeless_records(dpo_run)
    first = recs[0]
    assert first["step"] == 0 and abs(first["eval_loss"] - math.log(2)) < 1e-6  # step 0: policy = reference
    assert first["eval_rewards/accuracies"] == 0 and first["eval_rewards/margins"] == 0
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"} <= set(r)
        assert abs(r["rewards/margins"] - (r["rewards/chosen"] - r["rewards/rejected"])) < 1e-5
    assert steps[-1]["loss"] < math.log(2)
    assert (dpo_run / "reference_logps.safetensors").is_file()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_model_dir), str(dpo_run))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert "train/rewards/accuracies" in open(next((dpo_run / "tensorboard").rglob("events*")), "rb").read().decode(
        "latin-1")


def test_dpo_resume_after_a_kill_is_bit_identical(tmp_path, small_model_dir, pair_data, dpo_run, recorder, helpers):
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, pair_data, *PAIR_RUN)
    recorder.kill_at = 6  # steps 1-5 done (checkpoints 2 and 4), killed during step 6
    with pytest.raises(helpers.Killed):
        train(cfg)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    recorder.kill_at = None
    train(cfg, resume=True)  # the reference comes from the run directory: the step-0 model is gone
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(dpo_run / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert helpers.timeless_records(out) == helpers.timeless_records(dpo_run)


def test_resume_on_other_pairs_is_refused(tmp_path, small_model_dir, pair_data, dpo_run, helpers):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(dpo_run, out)
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(SAMPLE_TRAIN.read_text(encoding="utf-8").splitlines()[16:32]) + "\n")
    cfg = helpers.make_cfg(out, small_model_dir, (other, pair_data[1]), *PAIR_RUN, "training_config.max_steps=8")
    with pytest.raises(PhiloraError) as e:
        train(cfg, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and ("other train pairs" in msg or "data.train" in msg), msg


@pytest.mark.parametrize("objective, extra", [("orpo", []), ("simpo", ["training_config.beta=2.0",
                                                                       "training_config.cpo_alpha=0.5"])])
def test_orpo_and_simpo_train(objective, extra, tmp_path, small_model_dir, pair_data, helpers):
    out = tmp_path / "run"
    train(helpers.make_cfg(out, small_model_dir, pair_data, *PAIR_RUN, f"training_config.objective={objective}",
                           "training_config.max_steps=3", "training_config.save_steps=0", *extra))
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["nll_loss"] > 0 for r in steps)
    assert not (out / "reference_logps.safetensors").exists()  # no reference model
    assert (out / "adapter_model.safetensors").is_file()


def test_sft_then_dpo_on_the_same_adapter(tmp_path, small_model_dir, small_data, pair_data, helpers):
    sft = tmp_path / "sft"
    train(helpers.make_cfg(sft, small_model_dir, small_data, "training_config.max_steps=3",
                           "peft_config.lora_dropout=0.0"))
    out = tmp_path / "dpo"
    train(helpers.make_cfg(out, small_model_dir, pair_data, *PAIR_RUN, f"peft_config.init_adapter={sft}",
                           "training_config.max_steps=2", "training_config.save_steps=0"))
    first = read_metrics(out)[0]
    assert first["step"] == 0 and abs(first["eval_loss"] - math.log(2)) < 1e-6  # the reference is the SFT adapter
    a, b = load_file(str(sft / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("overrides, data, needles", [
    (["training_config.objective=dpo"], "sft", ["train.jsonl:1", "'chosen' is missing"]),
    (["training_config.objective=dpo", "peft_config.init_adapter=/nonexistent/run"], "pairs",
     ["peft_config.init_adapter", "no such directory", "reference"]),
    (["training_config.objective=dpo", "training_config.fsdp=true"], "pairs", ["fsdp", "dpo"]),
])
def test_bad_input_is_one_line_before_the_model_loads(overrides, data, needles, tmp_path, small_model_dir,
                                                      small_data, pair_data, monkeypatch, helpers):
    from philora.run import train as train_module

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(train_module, "load_model_and_tokenizer", no_model)
    cfg = helpers.make_cfg(tmp_path / "run", small_model_dir, small_data if data == "sft" else pair_data, *overrides)
    with pytest.raises(PhiloraError) as e:
        train(cfg)
    helpers.one_line_error(e, *needles)


def test_reference_covers_the_pairs_the_run_reads(dpo_run, tmp_path, small_model_dir, pair_data, helpers):
    """6 steps x 2 pairs read 12 of the 16 train pairs: only those get a reference (the rest NaN);
    a resume that would read further is refused in one line (the step-0 model is gone)."""
    import shutil
    from safetensors import safe_open
    with safe_open(str(dpo_run / "reference_logps.safetensors"), framework="pt") as f:
        train_ref, eval_ref = f.get_tensor("train"), f.get_tensor("eval")
    assert train_ref.shape == (16, 2) and int(torch.isfinite(train_ref[:, 0]).sum()) == 12
    assert torch.isfinite(eval_ref).all() and eval_ref.shape == (6, 2)
    out = tmp_path / "run"
    shutil.copytree(dpo_run, out)
    for ckpt in list_checkpoints(out)[:-1]:
        shutil.rmtree(ckpt)
    cfg = helpers.make_cfg(out, small_model_dir, pair_data, *PAIR_RUN, "training_config.max_steps=12")
    with pytest.raises(PhiloraError) as e:
        train(cfg, resume=True)
    helpers.one_line_error(e, "fewer train pairs than this run reads", "--overwrite")


def test_eval_report_of_a_dpo_run(dpo_run, tmp_path):
    # `philora eval` of a preference run: the report compares base and tuned on the eval pairs by the
    # reference-free preference accuracy, recomputed here from preference_ref on the same pairs.
    import json

    from philora.core.config import load_config
    from philora.data.preference import build_pairs
    from philora.model.loading import load_source
    from philora.model.preference_ref import preference_accuracy
    from philora.use.report import evaluate_run, lora_disabled
    report = evaluate_run(str(dpo_run), out=str(tmp_path / "report"), samples=2, max_new_tokens=4)
    cfg = load_config(str(dpo_run / "config.yaml"))
    model, tokenizer, _ = load_source(str(dpo_run))
    pairs = build_pairs(cfg.data, tokenizer, cfg.training_config.seed, log=lambda *a, **k: None)[1]
    args = (pairs, tokenizer.pad_token_id, cfg.data.packing, cfg.data.max_length, 4, torch.device("cpu"))
    tuned = preference_accuracy(model, *args)
    with lora_disabled(model):
        base = preference_accuracy(model, *args)
    assert report["fine_tuned"]["preference_accuracy"] == pytest.approx(tuned["preference_accuracy"])
    assert report["base"]["preference_accuracy"] == pytest.approx(base["preference_accuracy"])
    assert report["label_tokens"] is None and "## Preference accuracy" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["eval_examples"] == len(pairs)
