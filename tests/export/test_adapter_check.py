"""philora.export.adapter_check: ``philora adapter check`` reports what vLLM would refuse or serve wrongly,
against real peft-written adapters and the base model's module names and shapes."""

import json

import pytest

from safetensors.torch import load_file, save_file

from philora.export.adapter_check import check_cli


@pytest.fixture(scope="module")
def mha_base(tmp_path_factory, helpers):
    return helpers.save_base(tmp_path_factory.mktemp("mha"), kv_heads=4)  # equal q/k/v slices


def check_lines(capsys, adapter, base=None):
    capsys.readouterr()
    code = check_cli(str(adapter), base=base)
    lines = capsys.readouterr().out.strip().splitlines()
    return code, [line for line in lines if line.startswith(("error:", "warning:"))], lines[-1]


def _edit(path, **changes):
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_check_clean_and_rank_notes(mha_base, tmp_path, capsys, helpers):
    helpers.philora_run_adapter(mha_base, tmp_path / "run")
    assert check_lines(capsys, tmp_path / "run") == (0, [], f"{tmp_path / 'run'}: ok (6 LoRA modules, rank 4/8)")
    helpers.peft_adapter(mha_base, tmp_path / "r64", r=64, lora_alpha=16, target_modules=["o_proj"])
    code, problems, _ = check_lines(capsys, tmp_path / "r64")
    assert code == 0 and problems == ["warning: rank 64: serve with vLLM --max-lora-rank 64 (its default is 16; "
                                      "allowed: 1, 8, 16, 32, 64, 128, 256, 320, 512)"]
    helpers.peft_adapter(mha_base, tmp_path / "r600", r=600, lora_alpha=16, target_modules=["o_proj"])
    code, problems, _ = check_lines(capsys, tmp_path / "r600")
    assert code == 1 and problems == ["error: rank 600 is beyond vLLM's largest --max-lora-rank (512)"]


def test_check_reports_what_vllm_rejects(mha_base, tmp_path, capsys, helpers):
    helpers.peft_adapter(mha_base, tmp_path / "dora", r=4, lora_alpha=8, target_modules=["o_proj"], use_dora=True)
    code, problems, last = check_lines(capsys, tmp_path / "dora")
    assert code == 1 and len(problems) == 1 and "DoRA" in problems[0] and last.endswith("1 error(s), 0 warning(s)")
    helpers.peft_adapter(mha_base, tmp_path / "misc", r=4, lora_alpha=8, target_modules=["o_proj"])
    _edit(tmp_path / "misc", bias="all", modules_to_save=["lm_head"])
    code, problems, _ = check_lines(capsys, tmp_path / "misc")
    assert code == 1 and any("modules_to_save" in p for p in problems) and any("bias='all'" in p for p in problems)


def test_check_against_the_base(mha_base, tmp_path, capsys, helpers):
    helpers.peft_adapter(mha_base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["qkv_proj"])
    _edit(tmp_path / "a", target_modules=["q_proj", "v_proj", "qkv_proj"])  # the cookbook's names do not exist
    code, problems, _ = check_lines(capsys, tmp_path / "a")
    assert code == 0 and problems == [f"warning: target_modules entry '{t}' matches no module of {mha_base}"
                                      for t in ("q_proj", "v_proj")]
    gqa = helpers.save_base(tmp_path / "gqa")  # qkv_proj has 128 rows there, not 192
    code, problems, _ = check_lines(capsys, tmp_path / "a", base=gqa)
    assert code == 1 and len(problems) == 2 + 2 and all("lora_B (192, 4)" in p for p in problems[:2])
    file = tmp_path / "a" / "adapter_model.safetensors"
    save_file({k.replace("qkv_proj", "query_key_value"): v for k, v in load_file(file).items()}, file)
    code, problems, _ = check_lines(capsys, tmp_path / "a")
    errors = [p for p in problems if p.startswith("error:")]
    assert code == 1 and len(errors) == 3 and "is not in the base model" in errors[0]
    assert "serve the base model unchanged" in errors[-1]
    _edit(tmp_path / "a", base_model_name_or_path=str(tmp_path / "gone"))
    code, problems, _ = check_lines(capsys, tmp_path / "a")
    assert code == 0 and "module names and shapes not checked; pass --base" in problems[-1]
    code, err = helpers.run_cli(capsys, "adapter", "check", tmp_path / "missing")
    assert code == 2 and err.startswith("philora: error:") and "no adapter_config.json" in err
