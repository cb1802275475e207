"""``philora data check``: counts against encode_chat and numpy, bad records one per line with exit
status 1, JSON on stdout, the histogram file, the tokenizer alone (the model directory used here
has no weights), and the cache filled for the training run that follows."""

import json
import math

import numpy as np
import pytest

from philora.data import build as data
from philora.cli import main
from philora.core.config import load_config
from philora.data.build import build_datasets, encode_chat, to_messages


def chat(q, a="Sure, here it is."):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def check(capsys, *args):
    capsys.readouterr()
    code = main(["data", "check", *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test."""
    import transformers

    from philora.model import loading

    def boom(*a, **k):
        raise AssertionError("data check loaded a model")
    monkeypatch.setattr(loading, "load_model_and_tokenizer", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_clean_data_counts_and_exit_0(tmp_path, capsys, phi3_tokenizer_dir, no_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    records = [chat(f"Question {i}: " + "tell me more " * (i % 9)) for i in range(30)]
    records += [records[3], records[4]]  # two exact duplicates
    records.append(chat("word " * 80))  # labels cut off by max_length: no trainable token
    records.append(chat("Hi", "long answer " * 40))  # truncated, kept
    path = write(tmp_path / "t.jsonl", records)
    args = [f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={path}", "data.max_length=64",
            "data.eval_fraction=0.1", "training_config.per_device_train_batch_size=3",
            "training_config.gradient_accumulation_steps=2"]
    code, out, err = check(capsys, *args, "--json", "--processes", "2")
    assert code == 0, err
    report = json.loads(out)
    full = [encode_chat(to_messages(r), tok) for r in records]  # the reference: one conversation at a time
    cut = [{k: v[:64] for k, v in e.items()} for e in full]
    kept = [e for e in cut if any(t != -100 for t in e["labels"])]
    truncated = sum(len(e["input_ids"]) > 64 and any(t != -100 for t in c["labels"]) for e, c in zip(full, cut))
    lengths = np.array([len(e["input_ids"]) for e in kept])
    (src,) = report["sources"]
    assert (src["path"], src["records"], src["examples"], src["skipped"]) == (str(path), 34, 33, 0)
    assert truncated >= 1 and (src["truncated"], src["dropped_no_labels"], src["no_trainable_token"]) == (truncated, 1, 1)
    assert src["duplicates"] == 2
    assert src["tokens"] == lengths.sum() and src["label_tokens"] == sum(sum(t != -100 for t in e["labels"]) for e in kept)
    assert src["lengths"]["p50"] == int(np.percentile(lengths, 50, method="inverted_cdf"))
    assert src["lengths"]["max"] == 64 and src["over_max_length"] == truncated + 1
    assert sum(src["histogram"]["counts"]) == 34
    held = max(1, round(33 * 0.1))
    assert src["per_epoch"]["examples"] == 33 - held and report["eval"]["examples"] == held
    assert report["train"]["steps_per_epoch"] == math.ceil((33 - held) / (3 * 2 * 2))
    assert report["ok"] and report["bad_records"] == 0
    code, text, _ = check(capsys, *args)
    assert code == 0 and text.strip().endswith("data check: ok") and f"train: {path}" in text


def test_bad_records_one_line_each_then_a_count_exit_1(tmp_path, capsys, phi3_tokenizer_dir, no_model):
    bad = [json.dumps(chat("q") | {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]})] * 55
    path = write(tmp_path / "t.jsonl", [chat(f"q{i}") for i in range(10)] + bad + ["{nope"] * 5)
    code, out, err = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={path}")
    assert code == 1
    lines = out.splitlines()
    named = [x for x in lines if x.startswith(f"{path}:")]
    assert len(named) == 50 and named[0] == f"{path}:11: message 2 has unknown role 'bot' (expected " + named[0].split("(expected ", 1)[1]
    assert [int(x.split(":")[1]) for x in named] == list(range(11, 61))
    assert "... and 10 more bad records" in lines and lines[-1] == "data check: problems found"
    code, out, _ = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={path}", "--json")
    report = json.loads(out)
    assert code == 1 and report["bad_records"] == 60 and len(report["sources"][0]["bad_records"]) == 50


def test_out_writes_the_histogram_and_the_cache_serves_training(tmp_path, capsys, phi3_tokenizer_dir,
                                                                  no_model, monkeypatch):
    path = write(tmp_path / "t.jsonl", [chat(f"q{i} " + "more " * i) for i in range(20)])
    out = tmp_path / "report"
    args = [f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={path}", "--out", out]
    code, _, err = check(capsys, *args)
    assert code == 0, err
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "data_check.json").read_text())["sources"][0]["examples"] == 20
    code, _, err = check(capsys, *args)
    assert code == 2 and "--force" in err.strip().splitlines()[-1]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    monkeypatch.setattr(data, "encode_chat", lambda *a, **k: 1 / 0)  # the run that follows: no tokenizing
    cfg = load_config(None, [f"data.train={path}"])  # as `philora train` would run after the check
    train, evals, _ = build_datasets(cfg.data, tok, cfg.training_config.seed, lambda *a: None)
    assert len(train) + len(evals) == 20


def test_mixture_and_unusable_data(tmp_path, capsys, phi3_tokenizer_dir, no_model):
    a = write(tmp_path / "a.jsonl", [chat(f"a{i}") for i in range(10)])
    b = write(tmp_path / "b.jsonl", [chat(f"b{i}") for i in range(6)])
    code, out, err = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", "data.eval_fraction=0",
                           f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}]", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(s["path"], s["weight"], s["examples"], s["per_epoch"]["examples"]) for s in report["sources"]] == [
        (str(a), 2.0, 10, 20), (str(b), 0.5, 6, 3)]
    assert report["train"]["per_epoch"]["examples"] == 23
    one = write(tmp_path / "one.jsonl", [chat("only")])
    code, out, _ = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={one}")
    assert code == 1 and "problem: " in out and "too few to hold out" in out
    code, _, err = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={tmp_path / 'nope.jsonl'}")
    assert code == 2 and err.strip().splitlines()[-1] == f"philora: error: {tmp_path / 'nope.jsonl'}: no such file"


def test_a_hub_dataset_with_and_without_an_eval_split(capsys, phi3_tokenizer_dir, no_model, monkeypatch):
    import datasets
    splits = {"train": [chat(f"q{i}") for i in range(20)]}

    def fake_load_dataset(name, split):
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return datasets.Dataset.from_list(splits[split])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    args = [f"model.name_or_path={phi3_tokenizer_dir}", "data.train=someone/chats", "data.eval_fraction=0.25", "--json"]
    code, out, err = check(capsys, *args)
    report = json.loads(out)
    assert code == 0, err
    assert [(s["role"], s["source"], s["examples"]) for s in report["sources"]] == [("train", "someone/chats[train]", 20)]
    assert report["eval"]["examples"] == 5 and "held out" in report["eval"]["source"]
    splits["test"] = [chat("t1"), chat("q3")]  # one of them also in train
    code, out, err = check(capsys, *args)
    report = json.loads(out)
    assert code == 0, err
    assert [(s["role"], s["source"], s["examples"]) for s in report["sources"]] == [
        ("train", "someone/chats[train]", 20), ("eval", "someone/chats[test]", 2)]
    assert report["eval"]["examples"] == 2 and report["eval"]["also_in_train"] == 1
    assert report["train"]["per_epoch"]["examples"] == 20


def test_preference_pairs_report(tmp_path, capsys, phi3_tokenizer_dir, no_model):
    # A preference objective: pairs counted against the encoder's own output, a bad record named by
    # file and line (exit 1), a pair whose chosen equals its rejected listed by where it is.
    from transformers import AutoTokenizer

    from philora.data.encoding import encode_chat
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    good = [{"prompt": [{"role": "user", "content": f"Question {i}?"}],
             "chosen": [{"role": "assistant", "content": f"Answer: {i}" + " yes" * i}],
             "rejected": [{"role": "assistant", "content": "no"}]} for i in range(6)]
    same = {"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}
    path = write(tmp_path / "pairs.jsonl", good + [same, {"prompt": "x", "chosen": "y"}])
    args = [f"model.name_or_path={phi3_tokenizer_dir}", f"data.train={path}", "training_config.objective=dpo"]
    code, out, _ = check(capsys, *args, "--json")
    report = json.loads(out)
    (train,) = report["sources"]
    assert code == 1 and not report["ok"]
    assert (train["records"], train["pairs"], train["skipped"], train["chosen_equals_rejected"]) == (8, 7, 1, 1)
    assert train["bad_records"][0].startswith(f"{path}:8: ")
    assert train["chosen_equals_rejected_at"] == [f"{path}:7"]
    # The longer side of the longest pair: its chosen conversation through the chat template, up to
    # its last label (the end-of-turn token): what max_length would cut.
    longest = max(len(encode_chat(r["prompt"] + r["chosen"], tok)["input_ids"]) for r in good)
    assert longest - 2 <= train["lengths"]["longer_side"]["max"] <= longest
    code, text, _ = check(capsys, *args)
    assert code == 1 and f"{path}:8" in text and text.strip().endswith("data check: problems found")


def test_a_missing_relative_path_names_the_working_directory(tmp_path, monkeypatch, capsys, phi3_tokenizer_dir, no_model):
    """A config's data paths are read from the working directory (a run's config.yaml keeps them as
    given): a relative one that is not there says which directory it was looked for in."""
    monkeypatch.chdir(tmp_path)
    code, _, err = check(capsys, f"model.name_or_path={phi3_tokenizer_dir}", "data.train=data/train.jsonl")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"philora: error: data/train.jsonl: no such file (a relative path is read from the working directory, {tmp_path})")
