"""Tests for philora.data.preference: record forms, one-line errors, encoding against the chat
template's own ids, packing and the data-check report."""

import json

import numpy as np
import pytest
import torch

from philora.core.config import DataConfig
from philora.data.encoding import IGNORE_INDEX, encode_chat
from philora.data.formats import DataError
from philora.data.preference import (SAMPLE, build_pairs, collate_pairs, encode_pair, load_pairs, pair_report,
                                     to_pair)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


SYSTEM_PROMPT = msgs(("system", "Be terse."), ("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"))
EXPLICIT = {"prompt": SYSTEM_PROMPT, "chosen": msgs(("assistant", "6")), "rejected": msgs(("assistant", "seven"))}




def test_forms_give_one_pair():
    prompt, chosen, rejected = to_pair(EXPLICIT, "f:1")
    assert prompt[0] == {"role": "system", "content": "Be terse."}
    assert prompt[2] == {"role": "assistant", "content": "4", "train": False}  # context, not trained
    assert chosen == msgs(("assistant", "6")) and rejected == msgs(("assistant", "seven"))
    implicit = {"chosen": SYSTEM_PROMPT + msgs(("assistant", "6")), "rejected": SYSTEM_PROMPT + msgs(("assistant", "seven"))}
    assert to_pair(implicit, "f:1") == (prompt, chosen, rejected)
    plain = to_pair({"prompt": "Sky color?", "chosen": "Blue.", "rejected": "Green."}, "f:1")
    assert plain == (msgs(("user", "Sky color?")), msgs(("assistant", "Blue.")), msgs(("assistant", "Green.")))
    # identical conversations (implicit): the last assistant turn is the completion, so data check can count it
    same = {"chosen": msgs(("user", "Hi"), ("assistant", "Yo")), "rejected": msgs(("user", "Hi"), ("assistant", "Yo"))}
    assert to_pair(same, "f:1") == (msgs(("user", "Hi")), msgs(("assistant", "Yo")), msgs(("assistant", "Yo")))


@pytest.mark.parametrize("record, needles", [
    ({"prompt": "q", "chosen": "a"}, ["f.jsonl:3", "'rejected' is missing"]),
    ({"prompt": "q", "rejected": "a"}, ["f.jsonl:3", "'chosen' is missing"]),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, ["f.jsonl:3", "'chosen' is empty"]),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "robot", "content": "b"}]},
     ["f.jsonl:3", "rejected message 1", "unknown role 'robot'"]),
    ({"chosen": msgs(("user", "A"), ("assistant", "x")), "rejected": msgs(("user", "B"), ("assistant", "y"))},
     ["f.jsonl:3", "share no prompt"]),
    ({"chosen": msgs(("user", "A"), ("assistant", "x"), ("user", "C"), ("assistant", "z")),
      "rejected": msgs(("user", "A"), ("assistant", "x"), ("user", "D"), ("assistant", "z"))},
     ["f.jsonl:3", "prompt differs between chosen and rejected at message 3"]),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."}, ["f.jsonl:3", "'prompt' is missing"]),
    ({"prompt": "q", "chosen": msgs(("user", "only a user turn")), "rejected": "b"},
     ["f.jsonl:3", "no assistant message"]),
    (["not", "an", "object"], ["f.jsonl:3", "expected a JSON object"]),
])
def test_bad_records_are_one_line(record, needles):
    from conftest import one_line_error
    with pytest.raises(DataError) as e:
        to_pair(record, "f.jsonl:3")
    one_line_error(e, *needles)


def test_encoding_is_the_templates_ids(chatml):
    """Each side's ids are the template's ids of prompt + completion, cut after the end-of-turn
    token; labels exactly the completion (content + <|im_end|>) after the generation prompt."""
    prompt, chosen, rejected = to_pair(EXPLICIT)
    status, pair = encode_pair(prompt, chosen, rejected, chatml, max_length=512)
    plain = [{k: m[k] for k in ("role", "content")} for m in prompt]
    p_ids = chatml.apply_chat_template(plain, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    for side, completion in (("chosen", chosen), ("rejected", rejected)):
        full = chatml.apply_chat_template(plain + completion, tokenize=True, return_dict=True)["input_ids"]
        ids, mask = pair[side].tolist(), pair[f"{side}_mask"].tolist()
        assert ids == full[:len(ids)] and ids[-1] == im_end and len(full) - len(ids) == 1  # the "\n" is cut
        assert mask == [0] * len(p_ids) + [1] * (len(ids) - len(p_ids))
        assert chatml.decode(ids[len(p_ids):-1]).strip() == completion[0]["content"]
    assert status == 0 and pair["prompt_length"] == len(p_ids)


def test_encoding_matches_sft_labels(phi3):
    """Phi-3's template: the same labels as philora's SFT encoding of the chosen conversation."""
    prompt, chosen, rejected = to_pair(EXPLICIT)
    _, pair = encode_pair(prompt, chosen, rejected, phi3, max_length=512)
    sft = encode_chat(prompt + chosen, phi3)
    n = len(pair["chosen"])
    assert pair["chosen"].tolist() == sft["input_ids"][:n]
    assert [t != IGNORE_INDEX for t in sft["labels"]][:n] == pair["chosen_mask"].astype(bool).tolist()
    assert all(t == IGNORE_INDEX for t in sft["labels"][n:])  # nothing trained was cut


def test_truncation_and_drop(chatml):
    prompt, chosen, rejected = to_pair({"prompt": "q", "chosen": "a" * 40, "rejected": "b"})
    _, full = encode_pair(prompt, chosen, rejected, chatml, max_length=512)
    p = full["prompt_length"]
    status, cut = encode_pair(prompt, chosen, rejected, chatml, max_length=p + 3)
    assert status == 1 and len(cut["chosen"]) == p + 3 and cut["chosen_mask"].sum() == 3
    assert cut["rejected"].tolist() == full["rejected"].tolist()
    assert encode_pair(prompt, chosen, rejected, chatml, max_length=p + 3, truncation="drop") == (2, None)
    assert encode_pair(prompt, chosen, rejected, chatml, max_length=p)[0] == 3  # no label left: dropped


def pairs_file(tmp_path, records):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_load_counts_and_report(tmp_path, chatml):
    records = [EXPLICIT, {"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a"},
               {"prompt": "long", "chosen": "x" * 300, "rejected": "y"}]
    path = pairs_file(tmp_path, records)
    cfg = DataConfig(train=path, max_length=64)
    with pytest.raises(DataError, match=r"pairs.jsonl:3: 'rejected' is missing"):
        load_pairs(path, "train", cfg, chatml, log=lambda _: None)
    pairs, counts = load_pairs(path, "train", DataConfig(train=path, max_length=64, skip_bad_records=True), chatml,
                               log=lambda _: None)
    assert (counts["records"], counts["pairs"], counts["skipped"], counts["truncated"]) == (4, 3, 1, 1)
    assert counts["chosen_equals_rejected"] == 1
    rep = pair_report(pairs, counts)
    assert rep["chosen_equals_rejected_at"] == [f"{path}:2"] and rep["bad_records"][0].startswith(f"{path}:3:")
    assert rep["lengths"]["longer_side"]["max"] > 64 and rep["lengths"]["chosen"]["max"] < 64  # before / after the cut
    json.dumps(rep)  # what data check writes


def test_held_out_and_sample(tmp_path, chatml):
    path = pairs_file(tmp_path, [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)])
    train, evals, _ = build_pairs(DataConfig(train=path, eval_fraction=0.2), chatml, seed=1, log=lambda _: None)
    assert len(train) == 8 and len(evals) == 2 and "messages" in evals[0] and "messages" not in train[0]
    assert {p["where"] for p in train} | {p["where"] for p in evals} == {f"{path}:{i}" for i in range(1, 11)}
    train, evals, _ = build_pairs(DataConfig(train=SAMPLE), chatml, seed=1, log=lambda _: None)
    assert len(train) >= 100 and len(evals) >= 20


def test_collate_packed_and_unpacked(chatml):
    raw = [{"prompt": f"question {i}", "chosen": "yes " * i, "rejected": "no"} for i in range(1, 5)]
    pairs = [encode_pair(*to_pair(r), chatml, 512)[1] for r in raw]
    for k, p in enumerate(pairs):
        p["ref"] = (-1.0 - k, -2.0 - k)
    for packing in (True, False):
        b = collate_pairs(pairs, chatml.pad_token_id or 0, packing, 40)
        assert b["num_pairs"].item() == 4 and b["ref_logps"].tolist()[2] == [-3.0, -4.0]
        for j in range(8):  # each sequence is whole, in one row, positions from 0, labels its own
            where = (b["sequence"] == j).nonzero()
            r = where[:, 0].unique()
            assert len(r) == 1
            cols = where[:, 1]
            ids, mask = pairs[j // 2]["chosen" if j % 2 == 0 else "rejected"], pairs[j // 2][
                "chosen_mask" if j % 2 == 0 else "rejected_mask"]
            assert b["input_ids"][r[0], cols].tolist() == ids.tolist()
            assert b["position_ids"][r[0], cols].tolist() == list(range(len(ids)))
            lab = b["labels"][r[0], cols]
            assert lab.tolist() == np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist()
        assert ("attention_mask" in b) == (not packing)
        assert b["num_tokens"].item() == sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs)
    packed = collate_pairs(pairs, 0, True, 40)
    assert packed["input_ids"].shape[0] < 8  # pairs share rows
    for row in packed["sequence"]:  # a pair's two sequences share a row, chosen first
        seen = [int(s) for s in row.unique() if s >= 0]
        assert all((s ^ 1) in seen for s in seen)
    assert torch.equal(collate_pairs(pairs, 0, False, 40)["sequence"][:4, 0], torch.tensor([0, 2, 4, 6]))
