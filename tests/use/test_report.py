"""philora.use.report: a short tiny run ends with report.md/report.json whose losses match independent
computations (plain transformers for the base, peft for the fine-tuned model), the eval split is
data.build_datasets' own, and the overlap metrics give hand-computed values."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from philora.core.config import PeftConfig
from philora.core.config import load_config
from philora.data.build import SAMPLE_TRAIN, build_datasets, encode_chat
from philora.model.inject import inject_lora
from philora.model.loading import load_tokenizer
from philora.run.metrics import read_metrics
from philora.use.report import end_of_run, exact_match, lora_disabled, rouge_l, token_f1
from philora.run.train import train

RUN_OVERRIDES = ["training_config.max_steps=3", "training_config.eval_steps=0", "training_config.save_steps=0",
                 "training_config.logging_steps=1", "training_config.eval_max_samples=6",
                 "training_config.report_samples=2", "training_config.progress_bar=false",
                 "peft_config.r=4", "peft_config.lora_dropout=0.0", "data.max_length=256"]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    overrides = [f"model.name_or_path={tiny_model_dir}", f"training_config.output_dir={out}"]
    cfg = load_config(None, overrides + RUN_OVERRIDES)
    end_of_run(train(cfg, overwrite=True), cfg)  # as `philora train` does
    return out, cfg


@torch.no_grad()
def reference_loss(model, examples):
    """Loss per label token, one conversation at a time, with plain logits and cross-entropy."""
    total, count = 0.0, 0
    for ex in examples:
        out = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(ex["labels"][1:])
        total += F.cross_entropy(out, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def test_train_ends_with_the_report(run, tiny_model_dir, helpers):
    from peft import PeftModel
    out, cfg = run
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "loss.png", "adapter_model.safetensors", "config.yaml"} <= files
    report = json.loads((out / "report.json").read_text())
    tok = load_tokenizer(tiny_model_dir)
    _, evals, _ = build_datasets(cfg.data, tok, cfg.training_config.seed, log=lambda *a: None)
    examples = evals[:6]
    pairs = [(ex["messages"], ex) for ex in examples]
    assert report["eval_examples"] == 6 and len(report["samples"]) == 2
    final_eval = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m][-1]
    base = reference_loss(helpers.load_model(tiny_model_dir), examples)
    tuned = reference_loss(PeftModel.from_pretrained(helpers.load_model(tiny_model_dir), out).eval(), examples)
    print(f"report losses: base {report['base']['loss']:.6f} (reference {base:.6f}), "
          f"fine-tuned {report['fine_tuned']['loss']:.6f} (peft {tuned:.6f}, train's last eval {final_eval:.6f})")
    assert report["base"]["loss"] == pytest.approx(base, rel=1e-5)
    assert report["fine_tuned"]["loss"] == pytest.approx(tuned, rel=1e-5)
    assert report["fine_tuned"]["loss"] == pytest.approx(final_eval, rel=1e-5)
    assert report["fine_tuned"]["loss"] < report["base"]["loss"] - 0.1  # 3 steps at lr 2e-3 do move it
    for side in ("base", "fine_tuned"):
        assert report[side]["perplexity"] == pytest.approx(math.exp(report[side]["loss"]))
        assert all(0.0 <= report[side][k] <= 1.0 for k in ("exact_match", "token_f1", "rouge_l"))
    for sample, (messages, _) in zip(report["samples"], pairs):
        assert sample["reference"] == messages[-1]["content"] and sample["prompt"] == messages[:-1]
        assert isinstance(sample["base"], str) and isinstance(sample["fine_tuned"], str)
    md = (out / "report.md").read_text()
    assert "![training loss](loss.png)" in md and f"| base | {report['base']['loss']:.4f} |" in md
    assert md.count("\n| 1 | ") == 1 and md.count("\n| 2 | ") == 1


def test_eval_command_and_its_output_guard(run, tmp_path, capsys, helpers):
    out, _ = run
    before = json.loads((out / "report.json").read_text())
    code, _ = helpers.run_cli(capsys, "eval", out, "--out", tmp_path / "report", "--samples", "2")
    assert code == 0
    again = json.loads((tmp_path / "report" / "report.json").read_text())
    for side in ("base", "fine_tuned"):  # from disk, the same numbers and greedy generations
        assert again[side]["loss"] == pytest.approx(before[side]["loss"], rel=1e-5)
    assert [s["fine_tuned"] for s in again["samples"]] == [s["fine_tuned"] for s in before["samples"]]
    assert (tmp_path / "report" / "loss.png").is_file()
    for target in (tmp_path / "report", out):
        code, err = helpers.run_cli(capsys, "eval", out, "--out", target)
        assert code == 2 and err.startswith("philora: error:") and "--force" in err
    files = sorted(p.name for p in out.iterdir())
    code, _ = helpers.run_cli(capsys, "eval", out, "--out", out, "--force", "--samples", "1", "--max-new-tokens", "2")
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == files


def test_adapter_without_run_config_needs_data(tiny_model_dir, tmp_path, capsys, helpers):
    helpers.make_run(tmp_path / "run", tiny_model_dir, tokenizer_dir=tiny_model_dir)
    (tmp_path / "run" / "config.yaml").unlink()  # now a plain PEFT adapter directory
    code, err = helpers.run_cli(capsys, "eval", tmp_path / "run", "--out", tmp_path / "r1")
    assert code == 2 and "pass --data FILE" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, err = helpers.run_cli(capsys, "eval", tmp_path / "run", "--out", tmp_path / "r2", "--data", bad)
    assert code == 2 and err.startswith("philora: error:") and "bad.jsonl:1" in err
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(SAMPLE_TRAIN.read_text().splitlines(True)[:3]))
    assert helpers.run_cli(capsys, "eval", tmp_path / "run", "--out", tmp_path / "r3", "--data", data,
                           "--samples", "3", "--max-new-tokens", "4")[0] == 0
    report = json.loads((tmp_path / "r3" / "report.json").read_text())
    assert report["eval_examples"] == 3 and len(report["samples"]) == 3 and report["loss_plot"] is None


@pytest.mark.parametrize("held_out", [False, True])
def test_eval_examples_carry_their_messages(tiny_model_dir, tmp_path, held_out):
    """The report's held-out prompts come with build_datasets' eval examples: each one's messages
    encode to exactly its tokens (cut at max_length), whatever was skipped, dropped or held out."""
    tok = load_tokenizer(tiny_model_dir)
    overrides = []
    if held_out:  # a file: eval_fraction held out of train, after bad, too-long and dropped records
        lines = SAMPLE_TRAIN.read_text().splitlines()[:40]
        lines.insert(5, "{not json")
        (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
        overrides = [f"data.train={tmp_path / 'train.jsonl'}", "data.eval_fraction=0.25", "data.skip_bad_records=true",
                     "data.max_length=60", "data.truncation=drop", "training_config.seed=7"]
    cfg = load_config(None, overrides)
    train_set, evals, _ = build_datasets(cfg.data, tok, cfg.training_config.seed, log=lambda *a: None)
    assert len(evals) >= 5 and all("messages" not in ex for ex in train_set)
    for ex in evals:
        assert ex["messages"][-1]["role"] == "assistant"
        want = encode_chat(ex["messages"], tok, max_length=cfg.data.max_length)
        assert (ex["input_ids"], ex["labels"]) == (want["input_ids"], want["labels"])


def test_lora_disabled_is_exactly_the_base(tmp_path, helpers):
    base_dir = helpers.save_base(tmp_path / "base")
    ids = helpers.token_ids()
    model = helpers.load_model(base_dir)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules="all-linear", fused_slices={"qkv_proj": ["q"]}, lora_dropout=0.0))
    helpers.randomize(model)
    tuned = helpers.logits(model, ids)
    with lora_disabled(model):
        assert_close(helpers.logits(model, ids), helpers.logits(helpers.load_model(base_dir), ids), rtol=0, atol=0)
    assert_close(helpers.logits(model, ids), tuned, rtol=0, atol=0)
    assert (tuned - helpers.logits(helpers.load_model(base_dir), ids)).abs().max() > 1e-2


def test_overlap_metrics_hand_computed():
    assert exact_match("The cat.", "the  CAT") == 1.0 and exact_match("cat", "the cat") == 0.0
    assert token_f1("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # bags: common {a, b}
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x y", "z") == 0.0
    assert rouge_l("a b c d", "a c b d") == pytest.approx(2 * 3 / 8)  # LCS a-b-d (or a-c-d)
    assert rouge_l("w x y z", "x z") == pytest.approx(2 * 2 / 6)
    assert rouge_l("Paris.", "paris") == 1.0 and rouge_l("no", "yes") == 0.0
