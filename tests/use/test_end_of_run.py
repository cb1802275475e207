"""The end-of-run report can never kill a finished run, and it reports the run's own eval numbers.

Regression: with ``data.skip_bad_records=true`` and a chat template that raises on a record
(Llama-2/Mistral-style templates reject non-alternating roles), training skipped the record, but the
report re-did the eval split with its own copy of the data code, met the record again and died with a
raw jinja2 traceback: no report.md, exit 1.
"""

import json
import shutil

import pytest

from philora.use import report
from philora.cli import main
from philora.run.metrics import read_metrics

STRICT = ("{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def strict_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with a template that raises on two turns of one role in a row."""
    out = tmp_path_factory.mktemp("strict")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    template = out / "chat_template.jinja"
    template.write_text(STRICT + template.read_text(encoding="utf-8"), encoding="utf-8")
    return out


def conversations(n, bad_every=0):
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."}]
        if bad_every and i % bad_every == 0:
            msgs.insert(1, {"role": "user", "content": "Please answer."})  # user, user: rejected
        rows.append(json.dumps({"messages": msgs}))
    return "\n".join(rows) + "\n"


def args(out, model, data, *more):
    return ["train", f"model.name_or_path={model}", f"data.train={data}", f"training_config.output_dir={out}",
            "training_config.max_steps=2", "training_config.eval_steps=0", "training_config.save_steps=0",
            "training_config.report_samples=2", "training_config.progress_bar=false",
            "data.eval_fraction=0.25", "peft_config.r=2", *more]


def test_skipped_records_do_not_kill_the_report(strict_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(conversations(24, bad_every=3), encoding="utf-8")  # 8 of 24 rejected
    out = tmp_path / "run"
    assert main(args(out, strict_model, data, "data.skip_bad_records=true")) == 0
    captured = capsys.readouterr()
    assert "skipped 8 bad records" in captured.out
    assert "Traceback" not in captured.err and "warning" not in captured.err
    rep = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file() and (out / "adapter_model.safetensors").is_file()
    # One eval split and one eval loss: the report's fine-tuned loss is the run's final eval_loss.
    final = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m][-1]
    assert rep["fine_tuned"]["loss"] == final
    assert rep["eval_examples"] == 4  # 16 good records, a quarter held out


def test_a_failing_report_leaves_the_finished_run_saved(tiny_model_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text(conversations(12), encoding="utf-8")

    def broken(*a, **k):
        raise RuntimeError("out of memory while generating\nmore lines of context")

    monkeypatch.setattr(report, "generate_ids", broken)
    out = tmp_path / "run"
    assert main(args(out, tiny_model_dir, data)) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "end-of-run report failed" in line]
    assert len(warning) == 1 and "RuntimeError: out of memory while generating" in warning[0]
    assert "more lines" not in err and "Traceback" not in err
    assert (out / "adapter_model.safetensors").is_file() and not (out / "report.md").exists()


def test_philora_eval_reports_the_same_split_and_loss(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(conversations(12), encoding="utf-8")
    out = tmp_path / "run"
    assert main(args(out, tiny_model_dir, data, "training_config.report_samples=0")) == 0
    assert not (out / "report.json").exists()
    assert main(["eval", str(out), "--out", str(tmp_path / "rep"), "--samples", "1"]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    final = [m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m][-1]
    assert rep["fine_tuned"]["loss"] == pytest.approx(final, abs=1e-6)
    assert rep["eval_examples"] == 3
