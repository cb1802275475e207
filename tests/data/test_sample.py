"""The shipped sample dataset: deterministic, regenerable byte for byte, well formed, held out."""

import importlib.util
import json
from pathlib import Path

from philora.data.build import SAMPLE_EVAL, SAMPLE_TRAIN

# The generator is a script (scripts/make_sample_data.py), not part of the package.
_spec = importlib.util.spec_from_file_location(
    "make_sample_data", Path(__file__).resolve().parents[2] / "scripts" / "make_sample_data.py")
make_sample_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_sample_data)
N_EVAL, N_TRAIN = make_sample_data.N_EVAL, make_sample_data.N_TRAIN
generate, write_sample_files = make_sample_data.generate, make_sample_data.write_sample_files


def load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_generate_is_deterministic():
    assert generate(40, seed=7) == generate(40, seed=7)
    assert generate(40, seed=7) != generate(40, seed=8)
    assert generate(40, seed=7)[:10] == generate(10, seed=7)  # a prefix does not depend on n


def test_shipped_files_regenerate_byte_identically(tmp_path):
    write_sample_files(tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    assert (tmp_path / "train.jsonl").read_bytes() == SAMPLE_TRAIN.read_bytes()
    assert (tmp_path / "eval.jsonl").read_bytes() == SAMPLE_EVAL.read_bytes()


def test_records_are_valid_chats():
    for path, n in [(SAMPLE_TRAIN, N_TRAIN), (SAMPLE_EVAL, N_EVAL)]:
        records = load(path)
        assert len(records) == n
        for record in records:
            assert list(record) == ["messages"]
            messages = record["messages"]
            roles = [m["role"] for m in messages]
            if roles[0] == "system":
                roles = roles[1:]
            assert roles and roles == ["user", "assistant"] * (len(roles) // 2), messages
            for m in messages:
                assert set(m) == {"role", "content"}
                assert isinstance(m["content"], str) and m["content"].strip() == m["content"] != ""


def test_variety_system_messages_and_two_turns():
    for path in [SAMPLE_TRAIN, SAMPLE_EVAL]:
        records = load(path)
        with_system = sum(r["messages"][0]["role"] == "system" for r in records)
        two_turns = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in records)
        assert 0.1 * len(records) < with_system < 0.5 * len(records)
        assert 0.1 * len(records) < two_turns < 0.5 * len(records)
    questions = " ".join(m["content"] for r in load(SAMPLE_EVAL) for m in r["messages"])
    for family in ["plus", "capital", "opposite", "mix", "backwards", "letters", "after"]:
        assert family in questions, family


def test_train_and_eval_do_not_overlap():
    key = lambda r: json.dumps(r, sort_keys=True)
    train = {key(r) for r in load(SAMPLE_TRAIN)}
    evals = {key(r) for r in load(SAMPLE_EVAL)}
    assert len(train) == N_TRAIN and len(evals) == N_EVAL  # no duplicates either
    assert not train & evals
