"""Tests for philora.data.build / philora.data.formats: formats, validation errors, assistant-only labels, splits."""

import json

import pytest

from philora.data import build as data
from philora.core.config import DataConfig
from philora.data.build import DataError, build_datasets, detect_format, encode_chat, load_records, to_messages


LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' }}"
          "{% elif m['role'] == 'user' %}{{ '<s>[INST] ' + m['content'] + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'] | trim + ' </s>' }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def llama2(phi3):
    """Llama-2-like template: the content is trimmed, follows a space and is followed by ' </s>'."""
    import copy
    tok = copy.deepcopy(phi3)
    tok.chat_template = LLAMA2
    return tok


def quiet(_):
    pass


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def chat(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = chat(("user", "Hi"), ("assistant", "Hello!"))
EXPECTED_GOOD = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]

# -----------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("record, fmt, expected", [
    (GOOD, "messages", EXPECTED_GOOD),
    ({"conversations": GOOD["messages"]}, "messages", EXPECTED_GOOD),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                        {"from": "gpt", "value": "Hello!"}]}, "sharegpt",
     [{"role": "system", "content": "Be brief."}] + EXPECTED_GOOD),
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello!"}]}, "sharegpt",
     EXPECTED_GOOD),
    ({"instruction": "Hi", "output": "Hello!"}, "alpaca", EXPECTED_GOOD),
    ({"instruction": "Hi", "input": "", "output": "Hello!"}, "alpaca", EXPECTED_GOOD),
    ({"instruction": "Add these.", "input": "2 and 3", "output": "5", "system": "Math."}, "alpaca",
     [{"role": "system", "content": "Math."}, {"role": "user", "content": "Add these.\n\n2 and 3"},
      {"role": "assistant", "content": "5"}]),
    ({"prompt": "Hi", "completion": "Hello!"}, "prompt_completion", EXPECTED_GOOD),
    ({"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
     "prompt_completion", EXPECTED_GOOD),
])
def test_each_format_maps_to_messages(record, fmt, expected):
    assert detect_format(record) == fmt
    assert to_messages(record, "auto", "x") == expected
    assert to_messages(record, fmt, "x") == expected


def test_trailing_user_turn_dropped_and_prompt_assistant_turns_not_trained():
    rec = chat(("user", "a"), ("assistant", "b"), ("user", "c"))
    assert to_messages(rec) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    rec = {"prompt": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "3+3"}], "completion": "6"}
    msgs = to_messages(rec)
    assert [m.get("train", True) for m in msgs] == [True, False, True, True]
    assert msgs[-1] == {"role": "assistant", "content": "6"}


BAD = [  # (record or raw line, format, expected fragment of the message)
    (chat(("user", "Hi"), ("bot", "Hello")), "auto",
     "message 2 has unknown role 'bot' (expected system, user, assistant, tool)"),
    ({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "auto", "message 1 has no 'role'"),
    (chat(("user", "Hi"), ("assistant", " \n\t")), "auto", "message 2 has empty content"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "auto",
     "message 1 'content' must be a string, got int"),
    ({"messages": "Hi there"}, "auto", "'messages' must be a list of messages, got str"),
    ({"messages": []}, "messages", "'messages' is empty"),
    ({"messages": ["Hi"]}, "auto", "message 1 must be an object, got str"),
    ({"messages": [{"role": ["user"], "content": "Hi"}]}, "auto", "message 1 has unknown role ['user']"),
    (chat(("system", "s"), ("user", "Hi")), "auto", "no assistant message to train on"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}, "auto",
     "message 2 has unknown role 'bot' (expected system, human, user, gpt, assistant)"),
    ({"instruction": "Hi", "output": ""}, "auto", "'output' is empty"),
    ({"instruction": "Hi"}, "alpaca", "'output' is missing"),
    ({"instruction": ["Hi"], "output": "x"}, "alpaca", "'instruction' must be a string, got list"),
    ({"instruction": "Hi"}, "auto", "cannot tell the format from keys ['instruction']"),
    ({"prompt": "Hi", "completion": ["x"]}, "auto", "completion message 1 must be an object"),
    ([1, 2], "auto", "expected a JSON object, got list"),
    ('{"messages": [', "auto", "invalid JSON: Expecting value"),
]


@pytest.mark.parametrize("bad, fmt, fragment", BAD)
def test_bad_record_names_file_and_line(tmp_path, bad, fmt, fragment):
    good = {"instruction": "a", "output": "b"} if fmt == "alpaca" else GOOD
    path = write_jsonl(tmp_path / "train.jsonl", [good, "", bad, good])  # the bad record sits on line 3
    with pytest.raises(DataError) as e:
        for where, record in load_records(str(path), "train"):
            to_messages(record, fmt, where)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and fragment in msg and "\n" not in msg, msg


def test_other_files_name_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": " "}]),
                   path)
    (w1, r1), (w2, r2) = load_records(str(path), "train")
    assert w1 == f"{path} record 1" and to_messages(r1, "auto", w1)[1]["content"] == "b"
    with pytest.raises(DataError, match=rf"^{path} record 2: 'output' is empty$"):
        to_messages(r2, "auto", w2)
    csv = tmp_path / "train.csv"
    csv.write_text("instruction,input,output\nSay hi,,hi\nAdd,1 and 2,3\n")
    assert [to_messages(r)[0]["content"] for _, r in load_records(str(csv), "train")] == ["Say hi", "Add\n\n1 and 2"]
    arr = tmp_path / "train.json"
    arr.write_text(json.dumps([GOOD, GOOD], indent=1))
    assert [w for w, _ in load_records(str(arr), "train")] == [f"{arr} record 1", f"{arr} record 2"]
    arr.write_text('[\n{"messages": []},\n{"messages": \n]')
    with pytest.raises(DataError, match=rf"^{arr}:4: invalid JSON"):
        load_records(str(arr), "train")
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "x.txt"), "train")


def test_skip_bad_records_counts(tmp_path, phi3):
    bad = ['{"oops', chat(("user", "a"), ("bot", "b")), chat(("user", "only a question"))]
    path = write_jsonl(tmp_path / "train.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(5)]
                       + bad)
    with pytest.raises(DataError, match=r"train.jsonl:6: invalid JSON"):
        build_datasets(DataConfig(train=str(path)), phi3, seed=0, log=lambda s: None)
    logs = []
    train, evals, stats = build_datasets(DataConfig(train=str(path), skip_bad_records=True), phi3, 0, logs.append)
    assert stats["train"]["records"] == 8 and stats["train"]["skipped"] == 3
    assert len(train) + len(evals) == 5
    assert any("skipped 3 bad records" in line and "train.jsonl:" in line for line in logs), logs


def test_template_errors_are_data_errors(tmp_path, phi3):
    import copy
    tok = copy.deepcopy(phi3)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}"
                         "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}")
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, chat(("system", "s"), ("user", "u"), ("assistant", "a")),
                                                  GOOD, GOOD])
    with pytest.raises(DataError, match=r"train\.jsonl:2: the chat template rejects this conversation: System role"):
        build_datasets(DataConfig(train=str(path)), tok, 0, quiet)
    train, evals, stats = build_datasets(DataConfig(train=str(path), skip_bad_records=True), tok, 0, quiet)
    assert stats["train"]["skipped"] == 1 and len(train) + len(evals) == 3


# -----------------------------------------------------------------------------
# encode_chat: labels


CONVERSATIONS = [
    [("user", "Hi"), ("assistant", "Hello!")],
    [("system", "You are terse.\n"), ("user", "  Two words?\n"), ("assistant", " Sure thing \n\n"),
     ("user", "Again"), ("assistant", "\n  Okay then.  ")],
    [("user", "Hello"), ("assistant", "Hello"), ("user", "Hello"), ("assistant", "Hello")],  # defeats str.find
    [("user", "Ünïcödé?"), ("assistant", "日本語 ✓ — naïve café 🙂"), ("user", "more"), ("assistant", "🙂\n")],
]


def label_runs(ids, labels):
    """Contiguous labelled runs as (start, end) index pairs."""
    runs, start = [], None
    for k, t in enumerate(labels + [-100]):
        if t != -100 and start is None:
            start = k
        elif t == -100 and start is not None:
            runs.append((start, k))
            start = None
    return runs


def decode_run(tok, ids, start, end):
    # decode with the token before as context, so SentencePiece's "strip one leading space" cannot hide a space
    return tok.decode(ids[start - 1:end])[len(tok.decode(ids[start - 1:start])):]


def expected_runs(tok_name, content):
    if tok_name == "phi3":  # the header token swallows the content's leading whitespace: it is in no token
        return {content.lstrip() + "<|end|>"}
    if tok_name == "chatml":
        return {content + "<|im_end|>"}
    # llama2 trims the content; the template's space before it may merge into the first content token;
    # the space before </s> is template text the model must emit to stop
    return {content.strip() + " </s>", " " + content.strip() + " </s>"}


@pytest.mark.parametrize("turns", CONVERSATIONS)
@pytest.mark.parametrize("tok_name", ["phi3", "chatml", "llama2"])
def test_labels_are_exactly_assistant_contents_and_end_token(request, turns, tok_name):
    tok = request.getfixturevalue(tok_name)
    msgs = [{"role": r, "content": c} for r, c in turns]
    ex = encode_chat(msgs, tok)
    ids, labels = ex["input_ids"], ex["labels"]
    expected_ids = tok.apply_chat_template(msgs, tokenize=True)
    assert ids == list(getattr(expected_ids, "input_ids", expected_ids))
    assert len(labels) == len(ids) and all(t in (-100, i) for t, i in zip(labels, ids))
    runs = [decode_run(tok, ids, a, b) for a, b in label_runs(ids, labels)]
    contents = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(runs) == len(contents)
    for run, content in zip(runs, contents):
        assert run in expected_runs(tok_name, content), (run, content)
    if tok_name != "llama2":
        assert labels[-1] == -100  # the final <|endoftext|> (Phi-3) or newline (ChatML)


def test_nothing_of_the_headers_is_labelled(phi3):
    msgs = [{"role": r, "content": c} for r, c in CONVERSATIONS[1]]
    ex = encode_chat(msgs, phi3)
    header_ids = {phi3.convert_tokens_to_ids(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>")}
    assert all(lab == -100 for i, lab in zip(ex["input_ids"], ex["labels"]) if i in header_ids)
    n_end = sum(1 for lab in ex["labels"] if lab == phi3.convert_tokens_to_ids("<|end|>"))
    assert n_end == 2  # the two assistant turns' <|end|>, not the system's or users'


@pytest.mark.parametrize("tok_name", ["phi3", "chatml", "llama2"])
def test_prefix_fallback_agrees(request, monkeypatch, tok_name):
    tok = request.getfixturevalue(tok_name)
    convs = [[{"role": r, "content": c} for r, c in t] for t in CONVERSATIONS]
    expected = [encode_chat(msgs, tok) for msgs in convs]
    monkeypatch.setattr("philora.data.encoding._labels_from_offsets", lambda *a: None)
    got = [encode_chat(msgs, tok) for msgs in convs]
    if tok_name != "llama2":
        assert got == expected
        return
    # token prefixes cannot tell template text from content: the template's space before the content
    # (a token of its own when the content starts with a newline) is labelled too; nothing else differs
    for g, e in zip(got, expected):
        assert g["input_ids"] == e["input_ids"]
        extra = [k for k, (a, b) in enumerate(zip(g["labels"], e["labels"])) if a != b]
        assert all(e["labels"][k] == -100 and tok.decode(g["input_ids"][k:k + 1]).strip() == "" for k in extra)
    assert any(g != e for g, e in zip(got, expected))


def test_prompt_assistant_turns_are_context(phi3):
    msgs = to_messages({"prompt": [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "four"},
                                   {"role": "user", "content": "3+3"}], "completion": "six"})
    ex = encode_chat(msgs, phi3)
    runs = label_runs(ex["input_ids"], ex["labels"])
    assert [decode_run(phi3, ex["input_ids"], a, b) for a, b in runs] == ["six<|end|>"]


@pytest.mark.parametrize("tok_name", ["phi3", "chatml"])
def test_matches_trl_completion_mask(request, tok_name):
    # TRL's SFTTrainer (prompt-completion, conversational) trains on the ids after the common prefix of
    # apply_chat_template(prompt, add_generation_prompt=True) and of apply_chat_template(prompt + completion).
    # That mask also covers what the template appends after the turn; ours stops at the end-of-turn token.
    tok = request.getfixturevalue(tok_name)
    prompt = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " What is 2+2?\n"}]
    completion = [{"role": "assistant", "content": "It is 4, of course. 🙂"}]
    ids = encode_chat(prompt + completion, tok)["input_ids"]
    labels = encode_chat(prompt + completion, tok)["labels"]
    prompt_ids = list(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    n = 0
    while n < len(prompt_ids) and prompt_ids[n] == ids[n]:
        n += 1
    ours = [k for k, t in enumerate(labels) if t != -100]
    assert ours[0] == n and ours == list(range(n, ours[-1] + 1))
    assert tok.decode(ids[ours[-1] + 1:]).strip() in ("", tok.eos_token)  # TRL's extra: newline / EOS only


def test_encode_chat_max_length(phi3):
    msgs = [{"role": r, "content": c} for r, c in CONVERSATIONS[1]]
    full = encode_chat(msgs, phi3)
    cut = encode_chat(msgs, phi3, max_length=7)
    assert cut == {"input_ids": full["input_ids"][:7], "labels": full["labels"][:7]}


# -----------------------------------------------------------------------------
# build_datasets


def test_truncation_and_drop_counts(tmp_path, phi3):
    long_answer = chat(("user", "Hi"), ("assistant", "word " * 50))   # labels start early: truncated, kept
    long_question = chat(("user", "word " * 50), ("assistant", "ok"))  # labels past the cut: dropped
    short = chat(("user", "Hi"), ("assistant", "Hello!"))
    path = write_jsonl(tmp_path / "train.jsonl", [long_answer, long_question, short, short])
    cfg = DataConfig(train=str(path), max_length=20, eval_fraction=0.0)
    logs = []
    train, evals, stats = build_datasets(cfg, phi3, 0, logs.append)
    assert (stats["train"]["truncated"], stats["train"]["dropped_no_labels"]) == (1, 1)
    assert len(train) == 3 and evals == [] and all(len(ex["input_ids"]) <= 20 for ex in train)
    assert stats["train"]["tokens"] == sum(len(ex["input_ids"]) for ex in train)
    assert stats["train"]["label_tokens"] == sum(t != -100 for ex in train for t in ex["labels"])
    assert any("1 truncated" in line for line in logs), logs
    train, _, stats = build_datasets(DataConfig(train=str(path), max_length=20, eval_fraction=0.0,
                                                truncation="drop"), phi3, 0, quiet)
    assert stats["train"]["dropped_too_long"] == 2 and len(train) == 2
    with pytest.raises(DataError, match="nothing to train on"):
        build_datasets(DataConfig(train=str(path), max_length=3, eval_fraction=0.0), phi3, 0, quiet)


def test_eval_fraction_split_is_seeded_and_disjoint(tmp_path, phi3):
    path = write_jsonl(tmp_path / "train.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(20)])
    cfg = DataConfig(train=str(path), eval_fraction=0.25)
    key = lambda exs: sorted(tuple(ex["input_ids"]) for ex in exs)
    t1, e1, _ = build_datasets(cfg, phi3, 7, quiet)
    t2, e2, _ = build_datasets(cfg, phi3, 7, quiet)
    t3, e3, _ = build_datasets(cfg, phi3, 8, quiet)
    assert key(e1) == key(e2) and key(t1) == key(t2) and len(e1) == 5 and len(t1) == 15
    assert not set(key(t1)) & set(key(e1)) and len(set(key(list(t1) + list(e1)))) == 20
    assert key(e3) != key(e1)
    _, e, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.001), phi3, 0, quiet)
    assert len(e) == 1  # at least one example
    one = write_jsonl(tmp_path / "one.jsonl", [GOOD])
    with pytest.raises(DataError, match="too few to hold out"):
        build_datasets(DataConfig(train=str(one)), phi3, 0, quiet)


def test_eval_file_and_sample_source(tmp_path, phi3, monkeypatch):
    train = write_jsonl(tmp_path / "t.jsonl", [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(4)])
    ev = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": "y"}])
    tr, e, stats = build_datasets(DataConfig(train=str(train), eval=str(ev)), phi3, 0, quiet)
    assert len(tr) == 4 and len(e) == 1 and stats["eval"]["source"] == str(ev)
    from philora.data import records
    monkeypatch.setattr(records, "SAMPLE_TRAIN", train)
    monkeypatch.setattr(records, "SAMPLE_EVAL", ev)
    tr, e, _ = build_datasets(DataConfig(train="sample"), phi3, 0, quiet)
    assert len(tr) == 4 and len(e) == 1


def test_hub_dataset_path(monkeypatch, phi3):
    import datasets
    splits = {"train": [chat(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(10)]}
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return datasets.Dataset.from_list(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_records("someone/chats", "train")[0][0] == "someone/chats[train] record 1"
    tr, e, _ = build_datasets(DataConfig(train="someone/chats", eval_fraction=0.2), phi3, 0, quiet)
    assert (len(tr), len(e)) == (8, 2) and ("someone/chats", "test") in calls  # no test split: held out
    splits["test"] = None  # a failure other than a missing split is an error, not a reason to hold out
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(splits[split] or 1 / 0))
    with pytest.raises(DataError, match=r"^someone/chats: cannot load dataset: division by zero$"):
        build_datasets(DataConfig(train="someone/chats"), phi3, 0, quiet)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits["test"] = [GOOD]
    tr, e, stats = build_datasets(DataConfig(train="someone/chats"), phi3, 0, quiet)
    assert (len(tr), len(e)) == (10, 1) and stats["eval"]["source"] == "someone/chats[test]"
