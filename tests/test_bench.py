"""philora bench: the smoke run works end to end, and model FLOPs are what the docstring says."""

from types import SimpleNamespace

from philora import bench


def test_quick_smoke_run_prints_the_table(tiny_model_dir, capsys):
    assert bench.main(["--quick", "--systems", "philora"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| philora |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) > 0  # tokens/s
    assert cells[-1] == "1"  # one run


def test_model_flops_by_hand():
    cfg = SimpleNamespace(hidden_size=4, num_hidden_layers=1, vocab_size=10, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=6)
    ex = {"input_ids": [1, 2, 3], "labels": [-100, -100, 3]}  # one label token
    # linear weights: qkv 4x(4+2+2) + o 4x4 + gate_up 4x12 + down 6x4 = 32+16+48+24 = 120
    lora = 7
    per_step = 3 * (4 * 120 + 6 * lora) + 12 * 4 * 1 * (1 + 2 + 3) + 1 * 4 * 10 * 4
    assert bench.model_flops({}, cfg, [ex], lora) == per_step / 3
    # LoRA r=16 on the same four projections: r * (in + out) each
    assert bench.lora_param_count(cfg) == 16 * ((4 + 8) + (4 + 4) + (4 + 12) + (6 + 4))
