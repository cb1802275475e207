"""Tokenized data in Arrow (philora.data.build.tokenize, philora.data.datastore, philora.data.examples.Examples):
the cache is reused exactly when nothing that changes the rows changed, any number of processes
gives the same rows, every example equals encode_chat on its record, rows are memory-mapped
(3 or 5 bytes per token), and failures leave the cache as it was."""

import errno
import json
import os
import tracemalloc

import pyarrow as pa
import pytest

from philora.data import build as data
from philora.data import datastore
from philora.core.config import DataConfig, DataSource
from philora.data.build import DataError, build_datasets, encode_chat, to_messages, tokenize
from philora.core.errors import PhiloraError
from philora.data.records import raw_batches


@pytest.fixture(scope="module")
def phi3(phi3_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))


def chat(i, extra=""):
    return {"messages": [{"role": "user", "content": f"Question {i}{extra}?"},
                         {"role": "assistant", "content": f"Answer number {i} is {i * 7}."}]}


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def reference(tok, records, max_length):
    """encode_chat on each record, truncated, with no-label examples dropped: what training must read."""
    out = []
    for r in records:
        ex = encode_chat(to_messages(r), tok)
        ex = {k: v[:max_length] for k, v in ex.items()}
        if any(t != -100 for t in ex["labels"]):
            out.append(ex)
    return out


def plain(examples):
    return [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]


def quiet(*a, **k):
    pass


def no_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tokenized although the cache holds these inputs")
    monkeypatch.setattr(data, "encode_chat", boom)


# -----------------------------------------------------------------------------
# the cache key


def test_second_run_reads_the_cache(tmp_path, phi3, monkeypatch):
    records = [chat(i) for i in range(12)]
    cfg = DataConfig(train=str(write(tmp_path / "t.jsonl", records)), eval_fraction=0.25)
    first = build_datasets(cfg, phi3, 0, quiet)
    logs = []
    with monkeypatch.context() as mp:
        no_tokenizing(mp)
        second = build_datasets(cfg, phi3, 0, logs.append)
    assert plain(second[0]) == plain(first[0]) and list(second[1]) == list(first[1])
    assert any("from the cache" in line for line in logs), logs
    assert sorted(map(str, plain(list(first[0]) + list(first[1])))) == sorted(map(str, reference(phi3, records, 2048)))


def change_content_keep_stat(path):
    """Rewrite one record with the same size and restore the modification time."""
    st = os.stat(path)
    text = path.read_text(encoding="utf-8")
    assert "Question 3" in text
    path.write_text(text.replace("Question 3", "Question 9"), encoding="utf-8")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size


@pytest.mark.parametrize("change", ["content", "max_length", "truncation", "format", "template", "path"])
def test_a_change_that_changes_rows_tokenizes_again(tmp_path, phi3, monkeypatch, change):
    import copy
    path = write(tmp_path / "t.jsonl", [chat(i, " " + "word " * (i % 5)) for i in range(8)])
    cfg, tok = DataConfig(train=str(path), eval_fraction=0.0, max_length=20), phi3
    before = plain(build_datasets(cfg, tok, 0, quiet)[0])
    if change == "content":
        change_content_keep_stat(path)
    elif change == "max_length":
        cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=21)
    elif change == "truncation":
        cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=20, truncation="drop")
    elif change == "format":
        cfg = DataConfig(train=str(path), eval_fraction=0.0, max_length=20, format="messages")
    elif change == "template":
        tok = copy.deepcopy(phi3)
        tok.chat_template = "{{ 'Note: ' }}" + tok.chat_template
    else:
        os.link(path, tmp_path / "same.jsonl")  # the same bytes under another name: errors name it
        cfg = DataConfig(train=str(tmp_path / "same.jsonl"), eval_fraction=0.0, max_length=20)
    logs = []
    after = plain(build_datasets(cfg, tok, 0, logs.append)[0])
    assert any("tokenized" in line and "from the cache" not in line for line in logs), logs
    if change in ("content", "max_length", "truncation", "template"):
        assert after != before
    records = [json.loads(line) for line in open(cfg.train, encoding="utf-8")]
    want = reference(tok, records, cfg.max_length)
    if cfg.truncation == "drop":
        want = [e for e, r in zip(reference(tok, records, 10 ** 6), records) if len(e["input_ids"]) <= 20]
    assert after == want


def test_settings_that_do_not_change_rows_reuse_the_cache(tmp_path, phi3, monkeypatch):
    bad = '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}'
    path = write(tmp_path / "t.jsonl", [chat(i) for i in range(6)] + [bad, "{oops"])
    with pytest.raises(DataError, match=rf"^{path}:7: message 2 has unknown role 'bot'"):
        build_datasets(DataConfig(train=str(path), eval_fraction=0.0), phi3, 0, quiet)
    logs = []
    with monkeypatch.context() as mp:
        no_tokenizing(mp)  # the failed run cached every row: skipping needs no tokenizing
        train, _, stats = build_datasets(DataConfig(train=str(path), eval_fraction=0.0, skip_bad_records=True,
                                                    num_proc=2, shuffle=False), phi3, 0, logs.append)
    assert len(train) == 6 and (stats["train"]["records"], stats["train"]["skipped"]) == (8, 2)
    assert any(f"skipped 2 bad records (first: {path}:7:" in line for line in logs), logs


# -----------------------------------------------------------------------------
# processes, files, memory


def test_any_number_of_processes_gives_the_same_rows(tmp_path, phi3):
    records = [chat(i, " more words" * (i % 4)) for i in range(40)] + ["{bad json"]
    path = str(write(tmp_path / "t.jsonl", records))
    tables = {}
    for procs in (1, 3):
        cfg = DataConfig(train=path, num_proc=procs, cache_dir=str(tmp_path / f"cache{procs}"), max_length=20)
        tables[procs], meta = tokenize(DataSource(path, format="auto", split="train"), cfg, phi3, quiet)
        assert meta["processes"] == procs and len(meta["files"]) == procs
    assert tables[1].equals(tables[3])
    assert tables[1].column("status").to_pylist().count(data.BAD) == 1


def test_processes_default_to_the_cores_with_enough_rows_each(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert datastore.processes(0, 100) == 1 and datastore.processes(0, 3500) == 3
    assert datastore.processes(0, 10 ** 6) == 8 and datastore.processes(5, 3) == 3 and datastore.processes(2, 10 ** 6) == 2


def test_rows_are_memory_mapped_three_bytes_per_token(tmp_path, phi3):
    path = write(tmp_path / "t.jsonl", [chat(i, " and more" * (i % 7)) for i in range(3000)])
    cfg = DataConfig(train=str(path), eval_fraction=0.0)
    build_datasets(cfg, phi3, 0, quiet)  # tokenize once
    allocated = pa.total_allocated_bytes()
    train, _, stats = build_datasets(cfg, phi3, 0, quiet)
    tokens = stats["train"]["tokens"]
    assert sum(len(e["input_ids"]) for e in train) == tokens > 40000
    assert pa.total_allocated_bytes() - allocated < tokens // 2  # the tokens are not copied out of the file
    table = train.parts[0].table
    assert table.schema.field("input_ids").type == pa.list_(pa.uint16())
    ids, mask = table.column("input_ids"), table.column("label_mask")
    assert sum(c.values.nbytes for c in ids.chunks) + sum(c.values.nbytes for c in mask.chunks) == 3 * tokens


def test_a_vocabulary_over_65536_keeps_its_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {"[UNK]": 0, **{t: i + 1 for i, t in enumerate(specials)}, **{f"w{i}": i + 4 for i in range(70000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|end|>",
                                  additional_special_tokens=specials)
    tok.chat_template = "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endfor %}"
    records = [{"messages": [{"role": "user", "content": f"w{i} w69999"},
                             {"role": "assistant", "content": f"w{65530 + i} w3"}]} for i in range(10)]
    path = write(tmp_path / "t.jsonl", records)
    train, _, _ = build_datasets(DataConfig(train=str(path), eval_fraction=0.0, shuffle=False), tok, 0, quiet)
    assert train.parts[0].table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert plain(train) == reference(tok, records, 2048)
    assert max(t for e in train for t in e["labels"]) == 65530 + 9 + 4


def test_json_lines_are_streamed(tmp_path):
    line = json.dumps(chat(1, " filler" * 200))
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(12000):  # ~17 MB
            f.write(line + "\n")
    tracemalloc.start()
    rows = datastore.write_rows(tmp_path / "records.arrow", datastore.RAW_SCHEMA, raw_batches(str(path), "jsonl"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows == 12000 and peak < path.stat().st_size / 4  # batches of lines, never the file


def test_lines_are_named_and_read_as_before(tmp_path, phi3):
    good = json.dumps(chat(1))
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\r\n\n" + b'{"messages": "\xff"}\n'
                     + json.dumps({"messages": [{"role": "user", "content": "a\u2028b"},
                                                {"role": "assistant", "content": "c"}]}).encode() + b"\n")
    with pytest.raises(DataError, match=rf"^{path}:3: not UTF-8 text \(invalid start byte at byte 14 of the line\)$"):
        build_datasets(DataConfig(train=str(path), eval_fraction=0.0), phi3, 0, quiet)
    train, _, stats = build_datasets(DataConfig(train=str(path), eval_fraction=0.0, skip_bad_records=True,
                                                shuffle=False), phi3, 0, quiet)
    assert stats["train"]["records"] == 3 and len(train) == 2
    assert train[1]["input_ids"] == encode_chat(to_messages(json.loads(path.read_bytes().split(b"\n")[3])), phi3)["input_ids"]


# -----------------------------------------------------------------------------
# failures leave the cache as it was


def entries(root):
    return sorted(p.name for p in root.iterdir() if p.name != "digests") if root.exists() else []


def test_a_full_disk_is_one_line_and_leaves_no_entry(tmp_path, phi3, monkeypatch):
    path = write(tmp_path / "t.jsonl", [chat(i) for i in range(4)])
    root = tmp_path / "cache"
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(root))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(datastore, "write_rows", full)
    with pytest.raises(PhiloraError) as e:
        build_datasets(cfg, phi3, 0, quiet)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and "data.cache_dir" in msg and str(root) in msg
    assert entries(root) == []
    monkeypatch.undo()
    assert len(build_datasets(cfg, phi3, 0, quiet)[0]) == 4


def test_an_interrupted_build_leaves_no_entry(tmp_path, phi3, monkeypatch):
    path = write(tmp_path / "t.jsonl", [chat(i) for i in range(4)])
    root = tmp_path / "cache"
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(root))
    with monkeypatch.context() as mp:
        def killed(*a, **k):
            raise KeyboardInterrupt
        mp.setattr(data, "encode_chat", killed)
        with pytest.raises(KeyboardInterrupt):
            build_datasets(cfg, phi3, 0, quiet)
    assert entries(root) == []
    assert len(build_datasets(cfg, phi3, 0, quiet)[0]) == 4


def test_two_builders_of_one_key_end_with_one_entry(tmp_path):
    root = tmp_path / "cache"

    def fill(tmp, inner=True):
        (tmp / "x.arrow").write_bytes(b"mine")
        if inner:  # another process finishes the same entry first
            datastore.build(root, "k", lambda t: fill(t, inner=False))
        return {"files": ["x.arrow"]}
    entry = datastore.build(root, "k", fill)
    assert entry == root / "k" and entries(root) == ["k"] and datastore.read_meta(entry) == {"files": ["x.arrow"]}


def test_file_digest_sees_a_same_size_rewrite(tmp_path):
    path = write(tmp_path / "t.jsonl", [chat(3)])
    root = tmp_path / "cache"
    first = datastore.file_digest(str(path), root)
    assert datastore.file_digest(str(path), root) == first  # memoised
    change_content_keep_stat(path)
    assert datastore.file_digest(str(path), root) != first


@pytest.mark.parametrize("damage", ["truncate", "remove", "meta"])
def test_a_damaged_entry_is_said_removed_and_tokenized_again(tmp_path, phi3, damage):
    records = [chat(i) for i in range(6)]
    path = write(tmp_path / "t.jsonl", records)
    root = tmp_path / "cache"
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(root), shuffle=False)
    build_datasets(cfg, phi3, 0, quiet)
    (entry,) = [root / e for e in entries(root)]
    tokens = entry / datastore.read_meta(entry)["files"][0]
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-100])
    elif damage == "remove":
        tokens.unlink()
    else:
        (entry / "meta.json").write_text('{"files": ')
    logs = []
    train, _, _ = build_datasets(cfg, phi3, 0, logs.append)
    assert any(line.startswith(f"data: the cached entry {entry} is damaged (") and line.endswith("tokenizing again")
               for line in logs), logs
    assert plain(train) == reference(phi3, records, 2048) and entries(root) == [entry.name]
