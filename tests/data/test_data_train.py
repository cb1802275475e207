"""Training on a weighted mixture: the run reads exactly the examples examples.epoch_indices
draws (tokens per step against that reference), a resume after a kill reads the cache (no
tokenizing) and ends bit-identical to the uninterrupted run, with epochs that draw anew."""

import json

import pytest
import torch
from safetensors.torch import load_file

from philora.data import build as data
from philora.data.examples import epoch_indices, epoch_size
from philora.run.metrics import read_metrics
from philora.run.train import train


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixture(small_data, tmp_path_factory):
    """Two sources from the small sample: 16 conversations (weight 1.5) and 8 (weight 0.5)."""
    d = tmp_path_factory.mktemp("mix")
    lines = small_data[0].read_text(encoding="utf-8").splitlines()
    a, b = write(d / "a.jsonl", lines[:16]), write(d / "b.jsonl", lines[16:24])
    return f"data.train=[{{path: {a}, weight: 1.5}}, {{path: {b}, weight: 0.5}}]"


MIX_RUN = ["training_config.max_steps=9", "training_config.save_steps=3", "training_config.per_device_train_batch_size=4",
           "peft_config.lora_dropout=0.1", "training_config.save_total_limit=3"]  # 28 examples per epoch: 36 read


@pytest.fixture(scope="module")
def full(small_model_dir, small_data, mixture, tmp_path_factory, helpers):
    out = tmp_path_factory.mktemp("mixfull") / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, mixture, *MIX_RUN)
    train(cfg)
    return out, cfg


def test_a_mixture_trains_on_the_drawn_examples(full, small_model_dir):
    out, cfg = full
    from philora.model.loading import load_tokenizer
    train_set, _, stats = data.build_datasets(cfg.data, load_tokenizer(small_model_dir), cfg.training_config.seed,
                                              log=lambda *a: None)
    n = epoch_size(train_set)
    assert n == 24 + 4 and [s["per_epoch"]["examples"] for s in stats["train"]["sources"]] == [24, 4]
    order = [int(i) for e in range(2) for i in epoch_indices(train_set, cfg.training_config.seed, e, True)]
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert [r["tokens"] for r in steps] == [sum(len(train_set[i]["input_ids"]) for i in order[4 * s:4 * s + 4])
                                            for s in range(9)]
    assert steps[-1]["epoch"] == round(36 / n, 4)


def test_a_resumed_mixture_reads_the_cache_and_matches(full, small_model_dir, small_data, mixture, tmp_path,
                                                        recorder, monkeypatch, capsys, helpers):
    ref, _ = full
    out = tmp_path / "run"
    cfg = helpers.make_cfg(out, small_model_dir, small_data, mixture, *MIX_RUN)
    recorder.kill_at = 8  # checkpoints 3 and 6 saved; killed in step 8 (in the second epoch: a new draw)
    with pytest.raises(helpers.Killed):
        train(cfg)
    recorder.kill_at = None
    monkeypatch.setattr(data, "encode_chat", lambda *a, **k: 1 / 0)  # the resume must not tokenize
    capsys.readouterr()
    train(cfg, resume=True)
    assert "from the cache" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "checkpoint-9/lora.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(ref / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = lambda rs: [json.dumps({k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")}) for r in rs]
    assert strip(read_metrics(out)) == strip(read_metrics(ref))
