"""philora.use.merge: the merged directory loads with AutoModelForCausalLM alone and gives the logits
of base + adapter as peft computes them; float32 merge, one cast; shards; stop tokens; guards."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

from philora.model.adapter import read_adapter
from philora.use import merge as merge_module
from philora.use.merge import merge


def test_merged_run_matches_peft_and_loads_unaided(base_dir, tmp_path, helpers):
    ids = helpers.token_ids()
    live = helpers.make_run(tmp_path / "run", base_dir)
    out = merge(str(tmp_path / "run"), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)  # no philora, no peft
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    want = helpers.peft_logits(base_dir, tmp_path / "run", ids)
    got = helpers.logits(merged.eval(), ids)
    print(f"per-slice run: max |merged - peft| = {(got - want).abs().max():.2e}")
    assert_close(got, want, **helpers.TIGHT)
    assert_close(got, helpers.logits(live, ids), **helpers.TIGHT)
    assert (got - helpers.logits(helpers.load_model(base_dir), ids)).abs().max() > 1e-2


def test_merged_peft_adapter_with_rslora_and_patterns(base_dir, tmp_path, helpers):
    ids = helpers.token_ids()
    helpers.peft_adapter(base_dir, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True,
                         target_modules="all-linear", rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                         alpha_pattern={"qkv_proj": 16})
    out = merge(str(tmp_path / "adapter"), tmp_path / "merged")  # base from base_model_name_or_path
    got = helpers.logits(helpers.load_model(out), ids)
    want = helpers.peft_logits(base_dir, tmp_path / "adapter", ids)
    print(f"peft rsLoRA + patterns: max |merged - peft| = {(got - want).abs().max():.2e}")
    assert_close(got, want, **helpers.TIGHT)


@pytest.mark.parametrize("out_dtype", [None, "float32"])
def test_bf16_base_merges_in_float32_and_casts_once(tmp_path, out_dtype, helpers):
    base = helpers.save_base(tmp_path / "base", dtype=torch.bfloat16)
    helpers.peft_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"])
    out = merge(str(tmp_path / "adapter"), tmp_path / "merged", dtype=out_dtype)
    want_dtype = torch.bfloat16 if out_dtype is None else torch.float32
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == want_dtype
    original = helpers.load_model(base, torch.bfloat16).state_dict()
    adapter = read_adapter(tmp_path / "adapter")
    for name in adapter.modules:  # exactly one rounding of the float32 sum
        want = (original[f"{name}.weight"].float() + adapter.delta(name)).to(want_dtype)
        assert_close(merged.get_submodule(name).weight, want, rtol=0, atol=0)
    assert_close(merged.model.norm.weight, original["model.norm.weight"].to(want_dtype), rtol=0, atol=0)


def test_tiny_run_gets_tokenizer_stop_tokens_and_shards(tiny_model_dir, tmp_path, helpers):
    helpers.make_run(tmp_path / "run", tiny_model_dir, tokenizer_dir=tiny_model_dir)
    out = merge(str(tmp_path / "run"), tmp_path / "merged", max_shard_size="2MB")
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"} <= files
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    gen = json.loads((out / "generation_config.json").read_text())
    ids = tok.convert_tokens_to_ids
    assert {ids("<|end|>"), ids("<|endoftext|>")} <= set(gen["eos_token_id"])
    tokens = helpers.token_ids(1000)
    got = helpers.logits(helpers.load_model(out), tokens)
    want = helpers.peft_logits(tiny_model_dir, tmp_path / "run", tokens)
    print(f"tiny run (hidden 256, 4 layers): max |merged - peft| = {(got - want).abs().max():.2e}")
    assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 re-association: x(W + BA) vs xW + (xA)B


def test_quantized_run_merges_into_the_dequantized_base(base_dir, tmp_path, monkeypatch, capsys, helpers):
    """model.quantization set: the base comes from merge.load_dequantized_base (faked here)."""
    calls = []

    def load_dequantized_base(model_cfg, dtype):
        calls.append((model_cfg.quantization, dtype))
        return helpers.load_model(base_dir)

    monkeypatch.setattr(merge_module, "load_dequantized_base", load_dequantized_base)
    helpers.make_run(tmp_path / "run", base_dir, quantization="nf4")
    out = merge(str(tmp_path / "run"), tmp_path / "merged")
    assert calls == [("nf4", torch.float32)]
    assert "dequantized" in capsys.readouterr().out
    ids = helpers.token_ids()
    want = helpers.peft_logits(base_dir, tmp_path / "run", ids)
    assert_close(helpers.logits(helpers.load_model(out), ids), want, **helpers.TIGHT)


def test_existing_output_needs_force_and_stale_shards_go(base_dir, tmp_path, capsys, helpers):
    helpers.make_run(tmp_path / "run", base_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model-00007-of-00009.safetensors").write_text("stale")
    (out / "notes.txt").write_text("mine")
    code, err = helpers.run_cli(capsys, "merge", tmp_path / "run", "--out", out)
    assert code == 2 and err.startswith("philora: error:") and "--force" in err
    assert helpers.run_cli(capsys, "merge", tmp_path / "run", "--out", out, "--force")[0] == 0
    assert not (out / "model-00007-of-00009.safetensors").exists() and (out / "notes.txt").exists()
    helpers.load_model(out)


def test_bad_inputs_are_one_line(base_dir, tmp_path, capsys, helpers):
    helpers.make_run(tmp_path / "run", base_dir)
    other = helpers.save_base(tmp_path / "other", kv_heads=4)
    cases = [
        (["merge", tmp_path / "nope", "--out", tmp_path / "o1"], "no such directory"),
        (["merge", base_dir, "--out", tmp_path / "o2"], "nothing to merge"),
        (["merge", tmp_path / "run", "--out", tmp_path / "o3", "--base", other], "qkv_proj' has lora_A"),
        (["merge", tmp_path / "run", "--out", tmp_path / "run"], "input of this command"),
        (["merge", tmp_path / "run", "--out", tmp_path / "o4", "--dtype", "int8"], "--dtype"),
    ]
    for argv, needle in cases:
        code, err = helpers.run_cli(capsys, *argv)
        assert code == 2 and err.startswith("philora: error:") and needle in err, (argv, err)
