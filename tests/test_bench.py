"""bench/ (outside the package, loaded by path as ``philora bench`` does): the driver's smoke run
trains through ``philora.run.train.train`` and reads its metrics; train() and TRL get the same
tokens; model FLOPs are what the docstring says; qlora.py's smoke run."""

import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"philora_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = load("run")


def table_row(out: str, name: str) -> list:
    row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_quick_smoke_run_reads_train_metrics(tiny_model_dir, capsys, tmp_path):
    assert run.main(["--quick", "--systems", "philora", "--json", str(tmp_path / "runs.json")]) == 0
    out = capsys.readouterr().out
    cells = table_row(out, "philora")
    assert float(cells[1]) > 0  # tokens/s
    assert cells[-1] == "1"  # one run
    r = json.loads((tmp_path / "runs.json").read_text())["results"]["philora"][0]
    # The three steps of train()'s own metrics.jsonl; the timed ones (after the 1 untimed step)
    # hold exactly the benchmark's timed tokens, so train() trained the benchmark's conversations.
    assert [s["step"] for s in r["steps"]] == [1, 2, 3]
    timed_tokens = int(re.search(r"(\d+) timed tokens", out).group(1))
    assert sum(s["tokens"] for s in r["steps"][1:]) == timed_tokens
    seconds = sum(s["tokens"] / s["tokens_per_s"] for s in r["steps"][1:])
    assert r["tokens_per_s"] == pytest.approx(timed_tokens / seconds)
    assert r["losses"] == [s["loss"] for s in r["steps"]] and all(math.isfinite(x) for x in r["losses"])
    assert r["peak_bytes"] >= r["train_peak_bytes"] > r["rss_baseline"] > 0
    assert r["weights"] > 0
    assert r["wall_s"] > r["startup_s"] > 0  # whole process; process start to the end of step 1


def test_profile_run_sums_op_families(tiny_model_dir, capsys):
    assert run.main(["--quick", "--profile", "philora"]) == 0
    out = capsys.readouterr().out
    assert "profile of philora" in out and re.search(r"matmul\s+[\d.]+ s", out)


def test_train_and_trl_get_the_same_tokens(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from philora.core.config import DataConfig
    from philora.data.build import build_datasets
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    convs = run.make_conversations(tok, 12, (20, 100))
    assert convs == run.make_conversations(tok, 12, (20, 100))  # fixed data
    assert all(20 <= len(c["input_ids"]) <= 100 for c in convs)
    words = set(run.bench_words())  # the benchmark's own text, nothing else
    assert all(set(m["content"].split()) <= words for c in convs for m in c["messages"])
    run.write_data(tmp_path, convs)
    dc = DataConfig(train=str(tmp_path / "train.jsonl"), eval_fraction=0.0, format="messages",
                    max_length=100, shuffle=False)
    train_set, _, _ = build_datasets(dc, tok, 0, log=lambda *a, **k: None)
    trl_side = [json.loads(line) for line in (tmp_path / "tokens.jsonl").read_text().splitlines()]
    assert [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train_set] == trl_side


def test_model_flops_by_hand():
    cfg = SimpleNamespace(hidden_size=4, num_hidden_layers=1, vocab_size=10, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=6)
    ex = {"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}  # one label token
    # linear weights: qkv 4x(4+2+2) + o 4x4 + gate_up 4x12 + down 6x4 = 32+16+48+24 = 120
    lora = 7
    per_step = 3 * (4 * 120 + 6 * lora) + 12 * 4 * 1 * (1 + 2 + 3) + 1 * 4 * 10 * 4
    assert run.model_flops({}, cfg, [ex], lora) == per_step / 3
    # LoRA r=16 on the same four projections: r * (in + out) each
    assert run.lora_param_count(cfg) == 16 * ((4 + 8) + (4 + 4) + (4 + 12) + (6 + 4))


def test_qlora_smoke_run(tiny_model_dir, capsys):
    pytest.importorskip("bitsandbytes")
    qlora = load("qlora")
    assert qlora.main(["--shape", "tiny", "--variants", "nf4", "--steps", "1", "--warmup", "1",
                       "--repeats", "1", "--seq", "64"]) == 0
    cells = table_row(capsys.readouterr().out, "nf4")
    assert float(cells[1]) > 0 and float(cells[4]) > 0  # tokens/s, training peak over pre-load
    assert math.isfinite(float(cells[-1]))  # loss


def test_lora_param_count_of_a_llama_equals_peft():
    """Llama's separate q/k/v/gate/up projections (SmolLM2's shape, --shape smollm2): the count is
    PEFT's own number of trainable parameters at the benchmark's LoRA settings."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(target_modules="all-linear", r=run.LORA["r"],
                                                             lora_alpha=run.LORA["lora_alpha"]))
    assert run.lora_param_count(cfg) == model.get_nb_trainable_parameters()[0]


def test_ratios_pair_rows_with_the_baseline_on_their_allocator():
    """A TCMalloc row is compared with trl-*-tcmalloc when that ran, a glibc row with trl-*; the line
    under the table names each row's allocator."""
    lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"

    def runs(tok_s, peak, malloc):
        return [{"tokens_per_s": tok_s, "peak_bytes": peak, "loss": 1.0, "wall_s": 10.0, "startup_s": 1.0,
                 "peak_flops": 1e9, "malloc": malloc}]
    results = {"philora": runs(300, 1 * 2**30, lib), "philora-glibc": runs(300, 2 * 2**30, None),
               "trl-cookbook": runs(100, 4 * 2**30, None), "trl-padding-free": runs(150, 4 * 2**30, None),
               "trl-cookbook-tcmalloc": runs(120, 2 * 2**30, lib)}
    out = run.table(results, 1.0, SimpleNamespace(cuda=False, loss_steps=5))
    assert table_row(out, "philora")[2:4] == ["2.50", "2.00"]  # x trl-cookbook-tcmalloc; x trl-padding-free
    assert table_row(out, "philora")[5] == "0.50"  # memory x trl-cookbook-tcmalloc
    assert table_row(out, "philora-glibc")[2:4] == ["3.00", "2.00"] and table_row(out, "philora-glibc")[5] == "0.50"
    assert f"philora: TCMalloc ({lib})" in out and "philora-glibc: glibc malloc" in out
