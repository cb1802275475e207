"""philora export gguf, the file: the GGUF equals what llama.cpp's own convert_hf_to_gguf.py writes
(tensors and metadata, bit for bit, beyond the documented additions), a run is merged on the way
with a Modelfile beside it, and bad inputs are one-line errors. llama.cpp running the exported files:
test_export_gguf_llama_cpp.py; the tiny models and runs: gguf_models.py (``gguf_models`` fixture).

llama.cpp's converter is read from the llama-cpp-python source distribution (``scripts/setup.sh
--tests`` puts it in .venv/src; never committed). The converter tests skip only when llama_cpp is
not importable (``scripts/setup.sh --tests`` installs it).
"""

import importlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from philora.core.errors import PhiloraError
from philora.export.gguf import export_gguf

LLAMA_CPP = "llama_cpp_python-0.3.36"
try:
    importlib.import_module("llama_cpp")
    HAS_LLAMA_CPP = True
except ImportError:  # a broken build (OSError) fails loudly instead
    HAS_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not importable (scripts/setup.sh --tests)")


# -----------------------------------------------------------------------------
# GGUF files: what is in them, against llama.cpp's converter

@pytest.fixture(scope="session")
def converter(tmp_path_factory):
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py), unpacked from
    the llama-cpp-python sdist in .venv/src, or downloaded with pip when it is not there."""
    if not HAS_LLAMA_CPP:
        pytest.skip("llama_cpp is not importable (scripts/setup.sh --tests)")
    sdist = Path(sys.prefix) / "src" / f"{LLAMA_CPP}.tar.gz"
    out = tmp_path_factory.mktemp("llama.cpp")
    if not sdist.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                        str(out), LLAMA_CPP.replace("_", "-").replace("-0.", "==0.")], check=True)
        sdist = out / f"{LLAMA_CPP}.tar.gz"
    root = f"{LLAMA_CPP}/vendor/llama.cpp/"
    keep = (root + "convert_hf_to_gguf.py", root + "conversion/", root + "gguf-py/")
    with tarfile.open(sdist) as tar:
        tar.extractall(out, members=[m for m in tar.getmembers() if m.name.startswith(keep)], filter="data")
    return out / root / "convert_hf_to_gguf.py"


def _reference(converter, model_dir: Path, out: Path, outtype: str) -> Path:
    p = subprocess.run([sys.executable, str(converter), str(model_dir), "--outfile", str(out), "--outtype", outtype],
                       capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    return out


# keys philora adds beyond llama.cpp's converter, and the naming keys its converter guesses from the
# directory name (Phi-3-mini-4k-instruct -> basename, size label, fine-tune)
ADDED = {"tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
         "tokenizer.ggml.eot_token_id", "general.name", "general.basename", "general.finetune", "general.size_label"}


@needs_llama_cpp
@pytest.mark.parametrize("longrope,outtype", [(False, "f32"), (False, "bf16"), (True, "q8_0")])
def test_phi3_equals_llama_cpp_converter(converter, phi3_base, gguf_models, tmp_path, longrope, outtype):
    """Tiny Phi-3 with the real Phi-3 tokenizer (SentencePiece): every tensor (type, shape, bytes) and
    every metadata value equal llama.cpp's own converter's, plus eot / flags read from the tokenizer."""
    base = phi3_base
    if longrope:
        base = gguf_models.tiny_phi3(tmp_path / "phi3-longrope", gguf_models.PHI3_TOKENIZER, longrope=True)
    read = gguf_models.read
    ref_fields, ref_tensors = read(_reference(converter, base, tmp_path / "ref.gguf", outtype))
    fields, tensors = read(export_gguf(base, tmp_path / "out" / "model.gguf", outtype=outtype))
    assert tensors.keys() == ref_tensors.keys() and len(tensors) == (16 if longrope else 15)
    for name in tensors:
        assert tensors[name] == ref_tensors[name], name
    assert {k: v for k, v in fields.items() if k not in ADDED} == {k: v for k, v in ref_fields.items() if k not in ADDED}
    assert ref_fields.keys() - fields.keys() - ADDED == set()
    assert fields["tokenizer.ggml.eot_token_id"] == 32007  # <|end|>
    assert fields["tokenizer.ggml.eos_token_id"] == 32000 and fields["tokenizer.ggml.bos_token_id"] == 1
    assert fields["tokenizer.ggml.add_bos_token"] is False  # as the tokenizer: no <s> before a prompt
    assert re.search("phi-?3", fields["general.name"].lower())  # llama.cpp then right-strips Phi-3's specials
    if longrope:  # partial rotary: 12 of 16 dims; LongRoPE factors; tied: no output.weight
        assert fields["phi3.rope.dimension_count"] == 12 and "rope_factors_long.weight" in tensors
        assert "output.weight" not in tensors and fields["phi3.attention.sliding_window"] == 0


@needs_llama_cpp
def test_llama_bpe_equals_llama_cpp_converter(converter, tiny_model_dir, gguf_models, tmp_path):
    """Tiny Llama with a byte-fallback BPE tokenizer: tensors (q/k rows permuted) and metadata as
    llama.cpp's converter writes them; the vocabulary differs where documented (scores replay the
    merge order, special added tokens are CONTROL, padded to the embedding rows)."""
    base, read = gguf_models.tiny_llama(tmp_path / "llama", Path(tiny_model_dir)), gguf_models.read
    ref_fields, ref_tensors = read(_reference(converter, base, tmp_path / "ref.gguf", "f16"))
    fields, tensors = read(export_gguf(base, tmp_path / "out" / "model.gguf", outtype="f16"))
    assert tensors == ref_tensors
    vocab = {"tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"}
    assert {k: v for k, v in fields.items() if k not in ADDED | vocab} == \
        {k: v for k, v in ref_fields.items() if k not in ADDED | vocab}
    n = len(ref_fields["tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.tokens"][:n] == ref_fields["tokenizer.ggml.tokens"]
    assert len(fields["tokenizer.ggml.tokens"]) == fields["llama.vocab_size"] == 2048
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    types, ref_types = fields["tokenizer.ggml.token_type"], ref_fields["tokenizer.ggml.token_type"]
    assert all(types[i] == (3 if i in special else ref_types[i]) for i in range(n))
    assert fields["tokenizer.ggml.add_space_prefix"] is False  # this tokenizer never prepends "▁"


# -----------------------------------------------------------------------------
# a run in one command; bad inputs

def test_run_exports_merged_tensors_and_modelfile(phi3_run, phi3_merged, gguf_models, tmp_path):
    """One call: the run is merged on the way (the GGUF holds the merged weights, not the base's) and
    a Modelfile sits beside it with the Phi-3 template and every stop token."""
    from safetensors.torch import load_file
    out = export_gguf(phi3_run, tmp_path / "phi3.gguf", outtype="f32")
    fields, tensors = gguf_models.read(out)
    merged = load_file(str(phi3_merged / "model.safetensors"))
    for gguf_name, hf_name in [("blk.0.attn_qkv.weight", "model.layers.0.self_attn.qkv_proj.weight"),
                               ("blk.1.ffn_up.weight", "model.layers.1.mlp.gate_up_proj.weight"),
                               ("token_embd.weight", "model.embed_tokens.weight")]:
        assert tensors[gguf_name][2] == merged[hf_name].numpy().tobytes(), gguf_name
    assert fields["general.name"] == "chat-run (phi-3)"  # llama.cpp right-strips Phi-3 specials for such names
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.splitlines()[1] == "FROM ./phi3.gguf"
    assert '{{ "<|end|>\\n" }}' in modelfile and "# chat format: phi-3" in modelfile
    stops = re.findall(r'^PARAMETER stop "(.*)"$', modelfile, re.M)
    assert sorted(stops) == sorted(["<|assistant|>", "<|end|>", "<|endoftext|>"])
    assert not list(tmp_path.glob(".philora-export-*")) and not list(tmp_path.glob("*.part"))


def test_a_template_reading_tools_only_from_the_system_message_goes_in_behind_the_preamble(families, gguf_models,
                                                                                        tmp_path, capsys):
    """Phi-4-mini's template reads the tools only from the system message, which servers drop (a request's
    tools come as ``tools``), so the GGUF carries it behind toolparser's preamble in the data's tools shape,
    and the export says so; the converter tests above hold the other templates byte for byte."""
    from transformers import AutoTokenizer
    from philora.export.toolparser import reads_system_tools, tools_template
    model = families.dir("phi4-mini")
    own = AutoTokenizer.from_pretrained(model).chat_template
    assert reads_system_tools(own)
    capsys.readouterr()
    fields, _ = gguf_models.read(export_gguf(model, tmp_path / "flat" / "m.gguf", outtype="f32"))
    assert fields["tokenizer.chat_template"] == tools_template(own, "flat") and fields["tokenizer.chat_template"] != own
    assert "chat template: the model's own behind a preamble putting a request's tools onto the system message " \
           "as trained (flat JSON;" in capsys.readouterr().out
    fields, _ = gguf_models.read(export_gguf(model, tmp_path / "openai" / "m.gguf", outtype="f32", tools_shape="openai"))
    assert fields["tokenizer.chat_template"] == tools_template(own, "openai")


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(PhiloraError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_errors(phi3_base, gguf_models, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    _one_line_error(r"model_type 'gpt2' is not supported for GGUF export", export_gguf, gpt2, tmp_path / "a.gguf")
    qlora = gguf_models.make_run(tmp_path / "qlora-run", phi3_base, quantization="nf4")
    _one_line_error(r"QLoRA run .*philora merge", export_gguf, qlora, tmp_path / "b.gguf")
    _one_line_error(r"not a run or adapter", export_gguf, phi3_base, tmp_path / "c.gguf", adapter_only=True)
    (tmp_path / "d.gguf").write_bytes(b"x")
    _one_line_error(r"d.gguf' already exists; pass --force", export_gguf, phi3_base, tmp_path / "d.gguf")
    assert (tmp_path / "d.gguf").read_bytes() == b"x"
    _one_line_error(r"is a directory", export_gguf, phi3_base, tmp_path)
    _one_line_error("is not a llama.cpp type" if HAS_LLAMA_CPP else "needs llama-cpp-python", export_gguf,
                    phi3_base, tmp_path / "g.gguf", outtype="q9_9")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    _one_line_error(r"--outtype q4_k_m needs llama-cpp-python \(pip install llama-cpp-python\)",
                    export_gguf, phi3_base, tmp_path / "e.gguf", outtype="q4_k_m")
    export_gguf(phi3_base, tmp_path / "d.gguf", outtype="q8_0", force=True)
    assert (tmp_path / "d.gguf").read_bytes()[:4] == b"GGUF"
    _one_line_error(r"Modelfile' already exists", export_gguf, phi3_base, tmp_path / "f.gguf")
