"""Weighted mixing (philora.data.examples): what each epoch reads, against counts derived by hand.

Each source of weight w and n examples must put round(w * n) examples into every epoch: each of
its examples floor(w) times plus a seeded sample without replacement for the fraction, a different
sample each epoch; the order is a pure function of (seed, epoch), so a resume from a sample count
and another world size read the same examples. Weight 1 everywhere is exactly the plain order.
"""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from philora.data.batching import epoch_order
from philora.core.config import DataConfig, DataSource, load_config
from philora.data.build import build_datasets
from philora.run.distributed import World
from philora.data.examples import Examples, Part, epoch_indices, epoch_size, per_source
from philora.run.train import micro_batches


def table(n, start=0, labels=1):
    """n rows; row i holds the single token start + i (so an example names itself) and ``labels``
    trained tokens among 3 (ids: [start + i, 7, 8])."""
    ids = [[start + i, 7, 8] for i in range(n)]
    mask = [[0] + [1] * labels + [0] * (2 - labels) for _ in range(n)]
    return pa.table({"input_ids": pa.array(ids, pa.list_(pa.uint16())), "label_mask": pa.array(mask, pa.list_(pa.uint8())),
                     "num_labels": pa.array([labels] * n, pa.int32()),
                     "messages": pa.array([json.dumps([{"role": "user", "content": str(start + i)}]) for i in range(n)])})


def mixture(*sources, messages=False):
    """Examples of sources (n, weight); source k's row i has token id 1000 * k + i."""
    return Examples([Part(table(n, 1000 * k), np.arange(n), w, f"s{k}") for k, (n, w) in enumerate(sources)],
                    messages)


def ids(examples, indices):
    return [examples[int(i)]["input_ids"][0] for i in indices]


def test_each_epoch_has_each_source_weight_times():
    ex = mixture((10, 2.0), (7, 0.5), (4, 1.5), (5, 1.0))
    assert epoch_size(ex) == 20 + 4 + 6 + 5  # round half up: 3.5 -> 4
    for epoch in range(3):
        seen = Counter(ids(ex, epoch_indices(ex, seed=3, epoch=epoch)))
        assert all(seen[i] == 2 for i in range(10))  # weight 2: every example exactly twice
        half = [i for i in range(1000, 1007) if seen[i]]
        assert len(half) == 4 and all(seen[i] == 1 for i in half)  # without replacement
        assert sorted(seen[i] for i in range(2000, 2004)) == [1, 1, 2, 2]  # 1.5: all once, 2 of 4 twice
        assert all(seen[i] == 1 for i in range(3000, 3005))
        assert sum(seen.values()) == epoch_size(ex)


def test_draws_are_seeded_differ_by_epoch_and_average_to_the_weight():
    ex = mixture((40, 0.25), (8, 1.0))
    first = lambda seed, epoch: sorted(i for i in ids(ex, epoch_indices(ex, seed, epoch)) if i < 1000)
    assert first(1, 0) == first(1, 0)
    assert first(1, 0) != first(1, 1) and first(1, 0) != first(2, 0)
    seen = Counter(i for e in range(400) for i in first(1, e))
    assert all(abs(seen[i] / 400 - 0.25) < 0.1 for i in range(40))  # each example ~w times per epoch


def test_weight_one_is_the_plain_order():
    ex = mixture((9, 1.0), (4, 1.0))
    for epoch in range(3):
        assert list(epoch_indices(ex, 5, epoch)) == epoch_order(13, 5, epoch)
        assert list(epoch_indices(ex, 5, epoch, shuffle=False)) == list(range(13))
    assert epoch_indices([{"i": 0}] * 6, 5, 1) == epoch_order(6, 5, 1)


def test_order_is_shuffled_across_sources():
    ex = mixture((50, 1.0), (50, 2.0))
    order = ids(ex, epoch_indices(ex, 0, 0))
    assert order != sorted(order)
    plain = ids(ex, epoch_indices(ex, 0, 0, shuffle=False))  # sources in order, whole copies first
    assert sorted(plain) == sorted(order) and plain[:50] == list(range(50)) and plain[50:] == list(range(1000, 1050)) * 2


@pytest.mark.parametrize("world", [1, 2])
def test_micro_batches_resume_and_world_sizes_read_one_order(world):
    ex = mixture((11, 0.5), (6, 2.0))  # 6 + 12 = 18 per epoch
    n = epoch_size(ex)
    expected = [i for e in range(3) for i in ids(ex, epoch_indices(ex, 9, e))]
    batch = 4 // world
    def read(start, steps):
        ranks = [micro_batches(ex, start, batch, World(r, world), seed=9, shuffle=True) for r in range(world)]
        return [x["input_ids"][0] for _ in range(steps) for r in ranks for x in next(r)]
    assert read(0, 12) == expected[:48]
    assert read(20, 7) == expected[20:48]  # a resume at sample 20 (epoch 1), across the epoch boundary
    assert n == 18


def test_per_source_counts_and_examples_view():
    ex = mixture((10, 2.0), (7, 0.5), messages=True)
    got = per_source(ex, 3, 0)
    assert [(s["name"], s["examples"], s["label_tokens"]) for s in got] == [("s0", 20, 20), ("s1", 4, 4)]
    assert ex.counts() == {"examples": 17, "tokens": 51, "label_tokens": 17}
    assert ex[-1]["input_ids"] == [1006, 7, 8] and ex[-1]["labels"] == [-100, 7, -100]
    assert ex[3]["messages"] == [{"role": "user", "content": "3"}]
    view = ex[2:15:3]
    assert [e["input_ids"][0] for e in view] == [2, 5, 8, 1001, 1004]
    assert [e["input_ids"][0] for e in view[1:][::2]] == [5, 1001]
    assert [p.weight for p in view.parts] == [2.0, 0.5]
    with pytest.raises(IndexError):
        ex[17]


def write(path, n, tag):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{tag} question {i}"},
                                                     {"role": "assistant", "content": f"{tag} answer {i}"}]}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return str(path)


def test_build_datasets_mixes_sources_and_logs_each_per_epoch(tmp_path, phi3_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(phi3_tokenizer_dir))
    a, b = write(tmp_path / "a.jsonl", 20, "alpha"), write(tmp_path / "b.jsonl", 10, "beta")
    ev = write(tmp_path / "e.jsonl", 4, "eval")
    cfg = DataConfig(train=[DataSource(a, 2.0), DataSource(b, 0.5)], eval=ev)
    logs = []
    train, evals, stats = build_datasets(cfg, tok, 0, logs.append)
    assert len(train) == 30 and epoch_size(train) == 45 and len(evals) == 4
    per = stats["train"]["sources"]
    assert [(s["source"], s["weight"], s["examples"], s["per_epoch"]["examples"]) for s in per] == [
        (a, 2.0, 20, 40), (b, 0.5, 10, 5)]
    drawn = [train[int(i)] for i in epoch_indices(train, 0, 0)]  # the reference: count the epoch's labels
    labels_b = sum(sum(t != -100 for t in e["labels"]) for e in drawn if "beta" in tok.decode(e["input_ids"]))
    assert per[1]["per_epoch"]["label_tokens"] == labels_b
    line = next(x for x in logs if f"{b} (weight 0.5)" in x)
    assert "5 examples per epoch" in line and f"{labels_b} label tokens" in line
    # no data.eval: each source holds out its own fraction
    cfg = DataConfig(train=[DataSource(a, 2.0), DataSource(b, 1.0)], eval_fraction=0.2)
    train, evals, stats = build_datasets(cfg, tok, 0, logs.append)
    assert [s["examples"] for s in stats["train"]["sources"]] == [16, 8] and len(evals) == 6
    assert {tuple(e["input_ids"]) for e in evals}.isdisjoint(tuple(e["input_ids"]) for e in train)
    # a weighted eval list is drawn once (epoch 0, in source order)
    cfg = DataConfig(train=a, eval=[DataSource(ev, 2.0), DataSource(b, 0.5)])
    _, evals, _ = build_datasets(cfg, tok, 0, logs.append)
    assert len(evals) == 8 + 5 and all("messages" in e for e in evals)


def test_sources_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train:\n    - {path: a.jsonl, weight: 2}\n    - {path: someone/chats, weight: 0.5, "
                    "format: sharegpt, split: train_sft}\n  num_proc: 3\n")
    cfg = load_config(str(path))
    assert cfg.data.train == [DataSource("a.jsonl", 2.0), DataSource("someone/chats", 0.5, "sharegpt", "train_sft")]
    assert cfg.data.num_proc == 3
