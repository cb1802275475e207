"""GGUF files as base models (model/gguf.py): ``model.name_or_path: x.gguf`` (or ``pkg:PACKAGE/x.gguf``)
is converted once into a transformers model directory that every command then uses.

The reference is transformers' own GGUF reading (``from_pretrained(dir, gguf_file=...)``) and, for a
float32 file, the model it was exported from (philora's ``export gguf`` of a tiny random Llama): the
converted directory must give the same logits bit for bit, the same tokens and chat template. Bad
files are one-line errors that write nothing. The real SmolLM2 file: tests/model/test_real_model.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

TEXTS = ["Hello world, how are you? 12345", "The capital city of Pakistan is Islamabad.\n\nOK"]
CHAT = [{"role": "user", "content": "What is 17 plus 25?"}, {"role": "assistant", "content": "42."}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir, gguf_models):
    """A random tiny Llama (the tiny model's tokenizer and chat template) and its GGUF exports:
    {"base": model directory, "f32": file, "q8_0": file}."""
    from philora.export.gguf import export_gguf
    d = tmp_path_factory.mktemp("gguf-in")
    base = gguf_models.tiny_llama(d / "llama", Path(tiny_model_dir))
    files = {t: export_gguf(str(base), d / t / "tiny-llama.gguf", outtype=t) for t in ("f32", "q8_0")}
    return {"base": base, **files}


def direct(path, dtype=torch.float32):
    """transformers' own GGUF load: (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def from_dir(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def logits(model, n=40):
    return model(torch.arange(3, 3 + n).unsqueeze(0)).logits


def write_gguf(path, arch="llama", raw=None):
    """A small GGUF file written with the gguf package: one float32 tensor, or ``raw`` = (qtype,
    uint8 blocks) stored as that quantization type."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float32))
    if raw is not None:
        w.add_tensor("blk.0.attn_q.weight", raw[1], raw_dtype=raw[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_f32_file_converts_to_the_model_it_was_exported_from(tiny_gguf, capsys):
    from philora.model.loading import resolve_path
    capsys.readouterr()
    out = resolve_path(str(tiny_gguf["f32"]))
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "llama" in line and "F32" in line and "float32" in line and out in line, line
    assert out != str(tiny_gguf["f32"]) and (Path(out) / "model.safetensors").is_file()
    config = json.loads((Path(out) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]

    model, tok = from_dir(out)
    original, _ = from_dir(tiny_gguf["base"])
    gguf_model, gguf_tok = direct(tiny_gguf["f32"])
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=0)
    torch.testing.assert_close(logits(model), logits(gguf_model), rtol=0, atol=0)
    assert [tok(t)["input_ids"] for t in TEXTS] == [gguf_tok(t)["input_ids"] for t in TEXTS]
    assert tok.chat_template == gguf_tok.chat_template is not None
    assert tok.apply_chat_template(CHAT, tokenize=False) == gguf_tok.apply_chat_template(CHAT, tokenize=False)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (gguf_tok.eos_token, gguf_tok.pad_token, gguf_tok.bos_token)
    assert model.generation_config.eos_token_id == gguf_model.generation_config.eos_token_id


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_file_equals_transformers_direct_load(tiny_gguf, dtype):
    """q8_0 is de-quantized to float32 once; a run in bf16 casts from it exactly as transformers'
    own GGUF load in bf16 does."""
    from philora.model.loading import resolve_path
    out = resolve_path(str(tiny_gguf["q8_0"]))
    model, _ = from_dir(out, dtype)
    gguf_model, _ = direct(tiny_gguf["q8_0"], dtype)
    assert model.dtype == dtype
    torch.testing.assert_close(logits(model), logits(gguf_model), rtol=0, atol=0)
    original, _ = from_dir(tiny_gguf["base"])  # q8_0 is close to, not equal to, the original
    assert 0 < (logits(model).float() - logits(original)).abs().max() < 0.5


def test_second_resolve_reuses_the_conversion_and_a_changed_file_converts_again(tiny_gguf, tmp_path, monkeypatch,
                                                                                  capsys):
    import shutil

    from philora.model import gguf
    from philora.model.loading import resolve_path
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path / "cache"))
    copy = shutil.copy(tiny_gguf["q8_0"], tmp_path / "m.gguf")
    first = resolve_path(str(copy))

    def no_conversion(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf, "load_gguf", no_conversion)
    capsys.readouterr()
    assert resolve_path(str(copy)) == first
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "Q8_0" in line and first in line and "once" not in line, line

    monkeypatch.undo()
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path / "cache"))
    Path(copy).write_bytes(Path(tiny_gguf["f32"]).read_bytes())  # same name, another file
    second = resolve_path(str(copy))
    assert second != first and sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == sorted(
        [Path(first).name, Path(second).name])  # no staging directory left behind


def test_pkg_names_a_file_of_an_installed_package_without_importing_it(tiny_gguf, tmp_path, monkeypatch):
    import shutil

    from philora.model.loading import resolve_path
    pkg = tmp_path / "site" / "fake_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    shutil.copy(tiny_gguf["f32"], pkg / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_path("pkg:fake_models/tiny.gguf") == resolve_path(str(pkg / "tiny.gguf"))
    assert resolve_path("pkg:fake_models/__init__.py") == str(pkg / "__init__.py")  # any file: its path
    assert "fake_models" not in sys.modules


@pytest.mark.parametrize("name, needles", [
    ("pkg:no_such_package_x/m.gguf", ["no installed Python package 'no_such_package_x'", "pip install no-such-package-x"]),
    ("pkg:nofile.gguf", ["pkg:PACKAGE/FILE"]),
    ("missing/model.gguf", ["no such file"]),
])
def test_names_that_find_no_file(name, needles, helpers):
    from philora.model.loading import resolve_path
    with pytest.raises(Exception) as e:
        resolve_path(name)
    helpers.one_line_error(e, *needles)


def bad_files(tmp_path, good: Path):
    """{case: (path, words the one-line error holds)}."""
    import gguf
    data = good.read_bytes()
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    half, head = tmp_path / "half.gguf", tmp_path / "head.gguf"
    half.write_bytes(data[:len(data) // 2])
    head.write_bytes(data[:100])
    blocks = np.zeros((4, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1][1]), np.uint8)
    return {
        "not gguf": (text, ["is not a GGUF file"]),
        "truncated": (half, ["truncated"]),
        "header cut": (head, ["truncated"]),
        "architecture": (write_gguf(tmp_path / "bert.gguf", arch="bert"),
                         ["GGUF architecture 'bert'", "it reads", "llama", "qwen2"]),
        "quantization": (write_gguf(tmp_path / "q81.gguf", raw=(gguf.GGMLQuantizationType.Q8_1, blocks)),
                         ["tensor type Q8_1 cannot be de-quantized"]),
    }


@pytest.mark.parametrize("case", ["not gguf", "truncated", "header cut", "architecture", "quantization"])
def test_bad_files_are_one_line_errors_that_write_nothing(case, tiny_gguf, tmp_path, monkeypatch, helpers):
    from philora.model.loading import resolve_path
    path, needles = bad_files(tmp_path, Path(tiny_gguf["f32"]))[case]
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception) as e:
        resolve_path(str(path))
    helpers.one_line_error(e, str(path), *needles)
    assert not (tmp_path / "cache").exists()


def test_missing_gguf_package_is_one_line(tiny_gguf, tmp_path, monkeypatch, helpers):
    from philora.model.loading import resolve_path
    monkeypatch.setenv("PHILORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(Exception) as e:
        resolve_path(str(tiny_gguf["f32"]))
    helpers.one_line_error(e, "needs the gguf package", "pip install gguf")
    assert not (tmp_path / "cache").exists()


def test_cli_bad_gguf_is_one_line(tmp_path, small_data, capsys, helpers):
    bad = tmp_path / "bad.gguf"
    bad.write_text("hello")
    code, err = helpers.run_cli(capsys, "train", *helpers.make_args(tmp_path / "run", bad, small_data))
    assert code != 0 and "is not a GGUF file" in err and str(bad) in err


def test_train_merge_export_from_a_gguf_file(tiny_gguf, tmp_path, small_data, capsys, helpers):
    """A run whose base is a GGUF file: its adapter names the converted directory (what peft can
    load), peft's model equals philora's, merge writes a plain model, export gguf writes it back."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from philora.export.gguf import export_gguf
    from philora.model.loading import load_source, resolve_path
    from philora.use.merge import merge
    run = tmp_path / "run"
    code, err = helpers.run_cli(capsys, "train", *helpers.make_args(run, tiny_gguf["q8_0"], small_data))
    assert code == 0, err
    converted = resolve_path(str(tiny_gguf["q8_0"]))
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == converted

    ours, _, _ = load_source(str(run))
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(run), dtype=torch.float32).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), **helpers.TIGHT)
    merged = merge(str(run), tmp_path / "merged", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(plain), logits(ours), **helpers.TIGHT)
    assert (Path(merged) / "tokenizer.json").is_file()
    out = export_gguf(str(run), tmp_path / "back" / "tuned.gguf", outtype="f32")
    back, _ = direct(out)
    torch.testing.assert_close(logits(back), logits(ours), **helpers.TIGHT)
