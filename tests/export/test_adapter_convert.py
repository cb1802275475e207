"""philora.export.adapter_convert: loralib <-> PEFT conversions keep the logits (checked against the real
loralib and the real peft); bad inputs are one-line errors."""

import json

import loralib
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import philora.lora as plora
from philora.core.config import PeftConfig
from philora.export.adapter_convert import convert
from philora.core.errors import PhiloraError
from philora.model.inject import inject_lora

SLICES = {"qkv_proj": [True, False, True]}  # q and v, as in loralib's README


@pytest.fixture(scope="module")
def loralib_phi3(helpers):
    """loralib_phi3(base_dir, ...): the base with real loralib layers: MergedLinear where ``targets``
    gives enable_lora, else Linear."""
    def build(base_dir, r=4, lora_alpha=8, targets=None, seed=3):
        targets = targets or {"qkv_proj": SLICES["qkv_proj"], "o_proj": None, "gate_up_proj": None}
        model = helpers.load_model(base_dir)
        for name, module in list(model.named_modules()):
            short = name.rsplit(".", 1)[-1]
            if short not in targets:
                continue
            out_f, in_f = module.weight.shape
            if targets[short] is None:
                new = loralib.Linear(in_f, out_f, r=r, lora_alpha=lora_alpha, bias=False, merge_weights=False)
            else:
                new = loralib.MergedLinear(in_f, out_f, r=r, lora_alpha=lora_alpha, enable_lora=targets[short],
                                           bias=False, merge_weights=False)
            new.weight = module.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
        return helpers.randomize(model, seed).eval()
    return build


@pytest.fixture(scope="module")
def mha_base(tmp_path_factory, helpers):
    return helpers.save_base(tmp_path_factory.mktemp("mha"), kv_heads=4)  # equal q/k/v slices, as loralib needs


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loralib_checkpoint_to_peft(mha_base, tmp_path, suffix, helpers, loralib_phi3):
    ids = helpers.token_ids()
    model = loralib_phi3(mha_base)
    ckpt = tmp_path / f"lora{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # the whole model: LoRA is picked out
    torch.save(state, ckpt) if suffix == ".pt" else save_file(state, ckpt)
    convert(str(ckpt), tmp_path / "peft", to="peft", r=4, lora_alpha=8, base=mha_base, enable_lora=SLICES)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"]
    assert config["rank_pattern"] == {"qkv_proj": 8}
    got, want = helpers.peft_logits(mha_base, tmp_path / "peft", ids), helpers.logits(model, ids)
    print(f"loralib -> peft: max |peft - loralib| = {(got - want).abs().max():.2e}")
    assert_close(got, want, **helpers.TIGHT)


def test_slices_come_from_the_model_when_only_one_choice_fits(tmp_path, helpers):
    """GQA (q 64 rows, k and v 32): k+v is the only pair of 64 rows; q+v would be ambiguous."""
    base = helpers.save_base(tmp_path / "gqa")
    ids = helpers.token_ids()
    model = helpers.load_model(base)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules=["o_proj"], fused_slices={"qkv_proj": ["k", "v"]}, lora_dropout=0.0))
    helpers.randomize(model)
    torch.save(plora.lora_state_dict(model), tmp_path / "kv.pt")
    convert(str(tmp_path / "kv.pt"), tmp_path / "peft", to="peft", r=4, lora_alpha=8, base=base)
    assert_close(helpers.peft_logits(base, tmp_path / "peft", ids), helpers.logits(model, ids), **helpers.TIGHT)
    model = helpers.load_model(base)
    inject_lora(model, PeftConfig(r=4, lora_alpha=8, target_modules=["o_proj"], fused_slices={"qkv_proj": ["q", "v"]}, lora_dropout=0.0))
    torch.save(plora.lora_state_dict(model), tmp_path / "qv.pt")
    with pytest.raises(PhiloraError, match=r"fits: q\+k or q\+v\); pass enable_lora"):
        convert(str(tmp_path / "qv.pt"), tmp_path / "peft2", to="peft", r=4, lora_alpha=8, base=base)


def test_philora_adapter_to_loralib(mha_base, tmp_path, capsys, helpers, loralib_phi3):
    ids = helpers.token_ids()
    helpers.philora_run_adapter(mha_base, tmp_path / "run")
    want = helpers.peft_logits(mha_base, tmp_path / "run", ids)
    out = convert(str(tmp_path / "run"), tmp_path / "lora.safetensors", to="loralib", base=mha_base)
    assert "qkv_proj: MergedLinear(enable_lora=[True, False, True])" in capsys.readouterr().out
    model = loralib_phi3(mha_base, seed=99)
    missing, unexpected = model.load_state_dict(load_file(out), strict=False)
    assert not unexpected and all("lora_" not in k for k in missing)
    got = helpers.logits(model, ids)
    print(f"philora -> loralib: max |loralib - peft| = {(got - want).abs().max():.2e}")
    assert_close(got, want, **helpers.TIGHT)


def test_peft_patterns_and_rslora_to_loralib(mha_base, tmp_path, helpers, loralib_phi3):
    """One rank, per-module alphas and rsLoRA: loralib's single alpha/r absorbs them into lora_B."""
    ids = helpers.token_ids()
    helpers.peft_adapter(mha_base, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True,
                         target_modules=["o_proj", "down_proj"], alpha_pattern={"o_proj": 3})
    out = convert(str(tmp_path / "a"), tmp_path / "lora.pt", to="loralib", r=4, lora_alpha=4)
    model = loralib_phi3(mha_base, r=4, lora_alpha=4, targets={"o_proj": None, "down_proj": None}, seed=99)
    model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert_close(helpers.logits(model, ids), helpers.peft_logits(mha_base, tmp_path / "a", ids), **helpers.TIGHT)


def test_round_trip_keeps_the_tensors(mha_base, tmp_path, loralib_phi3):
    state = loralib.lora_state_dict(loralib_phi3(mha_base))
    torch.save(state, tmp_path / "lora.pt")
    convert(str(tmp_path / "lora.pt"), tmp_path / "peft", to="peft", r=4, lora_alpha=8, base=mha_base,
            enable_lora=SLICES)
    back = load_file(convert(str(tmp_path / "peft"), tmp_path / "back.safetensors", to="loralib", base=mha_base))
    assert back.keys() == state.keys()
    for k in state:
        assert_close(back[k], state[k], rtol=0, atol=0)


def test_convert_bad_inputs_are_one_line(mha_base, tmp_path, capsys, helpers, loralib_phi3):
    torch.save(loralib.lora_state_dict(loralib_phi3(mha_base)), tmp_path / "lora.pt")
    helpers.philora_run_adapter(mha_base, tmp_path / "run")
    (tmp_path / "taken.pt").write_text("")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04\x95not a state dict")
    lora = tmp_path / "lora.pt"
    cases = [
        (["--to", "peft", lora, tmp_path / "o1"], "pass --r and --lora-alpha"),
        (["--to", "peft", lora, tmp_path / "o2", "--r", "3", "--lora-alpha", "8"], "do not fit r=3"),
        (["--to", "peft", lora, tmp_path / "o3", "--r", "4", "--lora-alpha", "8"], "pass --base"),
        (["--to", "peft", lora, tmp_path / "o4", "--r", "4", "--lora-alpha", "8", "--base", mha_base],
         "fits: q+k or q+v or k+v"),
        (["--to", "peft", tmp_path / "run", tmp_path / "o5", "--r", "4", "--lora-alpha", "8"], "not a file"),
        (["--to", "peft", tmp_path / "pickle.pt", tmp_path / "o6", "--r", "4", "--lora-alpha", "8"], "cannot read"),
        (["--to", "loralib", tmp_path / "run", tmp_path / "x.safetensors"], "pass --base"),
        (["--to", "loralib", tmp_path / "run", tmp_path / "x.txt"], "ending in .safetensors"),
        (["--to", "loralib", tmp_path / "run", tmp_path / "x.pt", "--r", "3", "--base", mha_base], "has rank 4"),
        (["--to", "loralib", tmp_path / "run", tmp_path / "taken.pt", "--base", mha_base], "already exists"),
    ]
    for (flag, to, src, out, *rest), needle in cases:
        code, err = helpers.run_cli(capsys, "adapter", "convert", src, "--out", out, flag, to, *rest)
        assert code == 2 and err.startswith("philora: error:") and needle in err, (src, rest, err)
