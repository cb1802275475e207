"""philora export gguf: the GGUF equals what llama.cpp's own convert_hf_to_gguf.py writes (tensors and
metadata, bit for bit, beyond the documented additions), llama.cpp itself (llama-cpp-python)
tokenizes chat prompts as transformers does and generates the merged model's greedy tokens, the
Ollama TEMPLATE renders conversations as the chat template does, and bad inputs are one-line errors.

llama.cpp's converter is read from the llama-cpp-python source distribution (``scripts/setup.sh
--tests`` puts it in .venv/src; never committed). The llama.cpp tests skip only when llama_cpp is
not importable (``scripts/setup.sh --tests`` installs it).
"""

import importlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from philora.errors import PhiloraError
from philora.export_gguf import export_gguf

PHI3_TOKENIZER = Path(__file__).parent / "fixtures" / "phi3-tokenizer"
LLAMA_CPP = "llama_cpp_python-0.3.36"
try:
    importlib.import_module("llama_cpp")
    HAS_LLAMA_CPP = True
except ImportError:  # a broken build (OSError) fails loudly instead
    HAS_LLAMA_CPP = False
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama_cpp is not importable (scripts/setup.sh --tests)")

CHATS = [
    [{"role": "user", "content": "What is 17 plus 25?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]
REPLIES = ["17 plus 25 is 42.", "Blue.", "Waves fold on the shore,\nsalt wind carries gull voices,\nthe tide keeps its time."]


# -----------------------------------------------------------------------------
# tiny models and runs

def _tiny_phi3(out: Path, tokenizer_dir: Path, longrope=False, seed=0) -> Path:
    """A random tiny Phi-3 with the given tokenizer: GQA, sliding window 2047, untied (Phi-3-mini);
    or LongRoPE + partial rotary 0.75 + tied embeddings (Phi-4-mini's traits)."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    kw = dict(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              original_max_position_embeddings=4096, sliding_window=2047, tie_word_embeddings=False,
              initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    if longrope:
        half = int(0.75 * 16) // 2
        kw.update(max_position_embeddings=16384, partial_rotary_factor=0.75, tie_word_embeddings=True,
                  sliding_window=None, rope_parameters={
                      "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                      "short_factor": [1.0 + 0.1 * i for i in range(half)],
                      "long_factor": [1.5 + 0.2 * i for i in range(half)]})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        Phi3ForCausalLM(Phi3Config(**kw)).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def _fit(model_dir: Path, steps=25) -> Path:
    """Fit the model to CHATS + REPLIES (all weights, Adam), as fine-tuning would: greedy decoding of
    these prompts then has clear winners (top-2 logit margins of several units), as with real models,
    instead of a random model's near-ties that any rounding (bf16, q8_0) flips."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    texts = [tok.apply_chat_template(c + [{"role": "assistant", "content": r}], tokenize=False)
             for c, r in zip(CHATS, REPLIES)]
    ids = [torch.tensor([tok(t, add_special_tokens=False)["input_ids"]]) for t in texts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = sum(model(i, labels=i).loss for i in ids) / len(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(model_dir)
    return model_dir


def _tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
    """A random tiny Llama (GQA) with a byte-fallback BPE tokenizer (no tokenizer.model)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
    _copy_tokenizer(tokenizer_dir, out)
    return out


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)


def _linear_names(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _make_run(run: Path, base: Path, quantization=None, seed=3, scale_b=0.02) -> Path:
    """A philora run directory (config.yaml, PEFT adapter, the run's tokenizer) with LoRA on every
    linear layer; qkv / q_proj get another rank and alpha (rank_pattern, alpha_pattern), so one
    adapter-wide alpha could not express the scaling."""
    from philora.config import Config, ModelConfig, save_config
    run.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors, special = {}, r"(qkv_proj|q_proj)"
    for name, m in _linear_names(base).items():
        r = 8 if re.search(special + "$", name) else 4
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * scale_b
    save_file(tensors, str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 4,
        "lora_alpha": 8, "rank_pattern": {special: 8}, "alpha_pattern": {special: 24}, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in _linear_names(base)}), "use_rslora": False}))
    model_cfg = ModelConfig(name_or_path=str(base), **({"quantization": quantization} if quantization else {}))
    save_config(Config(model=model_cfg), run / "config.yaml")
    _copy_tokenizer(base, run)
    return run


@pytest.fixture(scope="module")
def phi3_base(tmp_path_factory):
    return _fit(_tiny_phi3(tmp_path_factory.mktemp("phi3") / "phi3-mini-tiny", PHI3_TOKENIZER))


@pytest.fixture(scope="module")
def phi3_run(phi3_base, tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("runs") / "chat-run", phi3_base)


@pytest.fixture(scope="module")
def phi3_merged(phi3_run, tmp_path_factory):
    from philora.merge import merge
    return merge(str(phi3_run), tmp_path_factory.mktemp("merged") / "m", dtype="float32")


# -----------------------------------------------------------------------------
# GGUF files: what is in them

def _read(path: Path):
    import gguf
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(s) for s in t.shape], np.asarray(t.data).tobytes()) for t in r.tensors}
    return fields, tensors


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
def test_phi3_equals_llama_cpp_converter(converter, phi3_base, tmp_path, longrope, outtype):
    """Tiny Phi-3 with the real Phi-3 tokenizer (SentencePiece): every tensor (type, shape, bytes) and
    every metadata value equal llama.cpp's own converter's, plus eot / flags read from the tokenizer."""
    base = phi3_base if not longrope else _tiny_phi3(tmp_path / "phi3-longrope", PHI3_TOKENIZER, longrope=True)
    ref_fields, ref_tensors = _read(_reference(converter, base, tmp_path / "ref.gguf", outtype))
    fields, tensors = _read(export_gguf(base, tmp_path / "out" / "model.gguf", outtype=outtype))
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
def test_llama_bpe_equals_llama_cpp_converter(converter, tiny_model_dir, tmp_path):
    """Tiny Llama with a byte-fallback BPE tokenizer: tensors (q/k rows permuted) and metadata as
    llama.cpp's converter writes them; the vocabulary differs where documented (scores replay the
    merge order, special added tokens are CONTROL, padded to the embedding rows)."""
    base = _tiny_llama(tmp_path / "llama", Path(tiny_model_dir))
    ref_fields, ref_tensors = _read(_reference(converter, base, tmp_path / "ref.gguf", "f16"))
    fields, tensors = _read(export_gguf(base, tmp_path / "out" / "model.gguf", outtype="f16"))
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

def test_run_exports_merged_tensors_and_modelfile(phi3_run, phi3_merged, tmp_path):
    """One call: the run is merged on the way (the GGUF holds the merged weights, not the base's) and
    a Modelfile sits beside it with the Phi-3 template and every stop token."""
    from safetensors.torch import load_file
    out = export_gguf(phi3_run, tmp_path / "phi3.gguf", outtype="f32")
    fields, tensors = _read(out)
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


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(PhiloraError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_are_one_line_errors(phi3_base, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    _one_line_error(r"model_type 'gpt2' is not supported for GGUF export", export_gguf, gpt2, tmp_path / "a.gguf")
    qlora = _make_run(tmp_path / "qlora-run", phi3_base, quantization="nf4")
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


# -----------------------------------------------------------------------------
# llama.cpp itself: tokenization, greedy tokens, stop tokens, LoRA adapters

N_NEW = 24  # greedy tokens per conversation


def _llama(path: Path, lora: Path = None):
    """llama.cpp on one thread, keeping every position's logits, with a float32 KV cache (its default
    f16 cache rounds keys and values: logits then differ by ~1e-2 even from an f32 file)."""
    import llama_cpp
    return llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=256, n_batch=256,
                           n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def _llama_greedy(llm, ids, n=N_NEW):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def _hf_greedy(model, ids, n=N_NEW):
    """Greedy tokens (no stop token: the raw argmax sequence) and each step's top-1 minus top-2 logit."""
    seq, margins = list(ids), []
    for _ in range(n):
        top = model(torch.tensor([seq])).logits[0, -1].topk(2)
        seq.append(int(top.indices[0]))
        margins.append(float(top.values[0] - top.values[1]))
    return seq[len(ids):], margins


def _prompts(tok, chats=CHATS):
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return texts, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def phi3_reference(phi3_merged):
    """The merged model in transformers: prompt texts and ids, logits on prompt + greedy tokens, and
    (greedy tokens, top-2 margins) per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(phi3_merged)
    model = AutoModelForCausalLM.from_pretrained(phi3_merged, dtype=torch.float32).eval()
    texts, ids = _prompts(tok)
    greedy = [_hf_greedy(model, i) for i in ids]
    with torch.no_grad():
        logits = [model(torch.tensor([i + g])).logits[0].numpy() for i, (g, _) in zip(ids, greedy)]
    return texts, ids, logits, greedy


# largest |llama.cpp logit - transformers logit| allowed along each prompt and its greedy reply
# (measured on this model: f32 7e-6, f16 0.010, bf16 0.087, q8_0 0.21, q4_k_m 1.4)
LOGIT_TOL = {"f32": 1e-4, "f16": 0.05, "bf16": 0.25, "q8_0": 0.6, "q4_k_m": 4.0}
STOPS = (32000, 32001, 32007)  # Phi-3's: <|endoftext|>, <|assistant|>, <|end|>


def _reply(tokens):
    """The tokens a runner shows: up to and including the first stop token."""
    return tokens[:next((k + 1 for k, t in enumerate(tokens) if t in STOPS), len(tokens))]


@needs_llama_cpp
@pytest.mark.parametrize("outtype", list(LOGIT_TOL))
def test_llama_cpp_reproduces_greedy_tokens(phi3_run, phi3_reference, tmp_path, outtype):
    """The exported run in llama.cpp: it tokenizes the chat-template text into transformers' ids, its
    logits stay within the type's rounding of the merged model's, and it generates the same replies
    (f32, f16: the same 24 raw greedy tokens, past the stop token too)."""
    texts, ids, ref_logits, ref = phi3_reference
    path = export_gguf(phi3_run, tmp_path / "m.gguf", outtype=outtype)
    llm = _llama(path)
    same = replies = 0
    for text, prompt, logits, (want, _) in zip(texts, ids, ref_logits, ref):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt
        got = _llama_greedy(llm, prompt)
        same += next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        replies += _reply(got) == _reply(want)
        err = np.abs(_llama_logits(llm, prompt + want) - logits).max()
        assert err < LOGIT_TOL[outtype], err
        if outtype in ("f32", "f16"):
            assert got == want
        if outtype != "q4_k_m":
            assert _reply(got) == _reply(want)
    print(f"{outtype}: {path.stat().st_size / 2**20:.2f} MiB, replies {replies}/{len(ids)}, "
          f"greedy tokens {same}/{len(ids) * N_NEW} before the first difference")
    assert replies >= len(ids) - 1  # q4_k_m: 4-bit; on this model all three agree


@needs_llama_cpp
def test_llama_cpp_stops_at_end_of_turn(phi3_run, tmp_path):
    """What a runner reads from the file: <|end|> is the end-of-turn token and ends generation (so do
    <|endoftext|>), Phi-3's specials are control tokens (never printed), BOS is not added."""
    import llama_cpp
    llm = _llama(export_gguf(phi3_run, tmp_path / "m.gguf", outtype="q8_0"))
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert llama_cpp.llama_vocab_eot(vocab) == 32007 and llama_cpp.llama_vocab_eos(vocab) == 32000
    assert llama_cpp.llama_vocab_is_eog(vocab, 32007) and llama_cpp.llama_vocab_is_eog(vocab, 32000)
    assert not llama_cpp.llama_vocab_is_eog(vocab, 450)
    assert llm.detokenize([450, 32007]) == b" The" and llm.detokenize([32007], special=True) == b"<|end|>"
    assert llm.tokenize(b"Hi", add_bos=True) == llm.tokenize(b"Hi", add_bos=False)  # add_bos_token false
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")


@needs_llama_cpp
def test_llama_cpp_runs_the_adapter_only_export(phi3_base, phi3_run, phi3_reference, tmp_path):
    """--adapter-only: the base GGUF plus the LoRA GGUF (scaling folded in, rank/alpha patterns and
    all) generate the merged model's greedy tokens; the Modelfile names the base and the adapter."""
    texts, ids, _, ref = phi3_reference
    base = export_gguf(phi3_base, tmp_path / "base" / "base.gguf", outtype="f32")
    lora = export_gguf(phi3_run, tmp_path / "lora" / "lora.gguf", outtype="f32", adapter_only=True)
    fields, tensors = _read(lora)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert len(tensors) == 2 * 8 and tensors["blk.0.attn_qkv.weight.lora_a"][1] == [64, 8]
    modelfile = (tmp_path / "lora" / "Modelfile").read_text()
    assert f"FROM {phi3_base.resolve()}" in modelfile and "ADAPTER ./lora.gguf" in modelfile
    llm = _llama(base, lora=lora)
    for prompt, (want, _) in zip(ids, ref):
        assert _llama_greedy(llm, prompt) == want


@needs_llama_cpp
def test_llama_cpp_tokenizes_bpe_vocabularies_like_transformers(tiny_model_dir, tmp_path):
    """philora's tiny model (Phi-3 with a byte-fallback BPE tokenizer, no tokenizer.model) and a tiny
    Llama with the same tokenizer: llama.cpp's ids for the sample chats equal transformers', because
    the scores replay the BPE merge order; its greedy tokens equal transformers' too."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from philora.data import SAMPLE_EVAL
    chats = [json.loads(line)["messages"][:-1] for line in SAMPLE_EVAL.read_text().splitlines()[:20]]
    for name, model_dir in [("tiny-phi3", Path(tiny_model_dir)), ("llama", _tiny_llama(tmp_path / "llama", Path(tiny_model_dir)))]:
        llm = _llama(export_gguf(model_dir, tmp_path / name / "m.gguf", outtype="f32"))
        tok = AutoTokenizer.from_pretrained(model_dir)
        texts, ids = _prompts(tok, chats)
        for text, want in zip(texts, ids):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        assert _llama_greedy(llm, ids[0], 12) == _hf_greedy(model, ids[0], 12)[0]


def _byte_level_tokenizer(out: Path, regex: str, template: str, specials):
    """A byte-level BPE tokenizer (GPT-2 bytes, a Split regex as Qwen2 / Phi-4-mini) trained on the
    sample data, with ``specials`` as special added tokens (the first is eos)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from philora.data import SAMPLE_TRAIN
    texts = [m["content"] for line in SAMPLE_TRAIN.read_text().splitlines() for m in json.loads(line)["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0],
                            chat_template=template).save_pretrained(out)
    return out


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PHI4_MINI = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
BYTE_LEVEL = {  # model type -> (pre-tokenizer regex, chat template, specials): Qwen2.5-like, Phi-4-mini-like
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+", CHATML, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    "phi3": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
             r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+", PHI4_MINI,
             ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]),
}


@needs_llama_cpp
@pytest.mark.parametrize("model_type", list(BYTE_LEVEL))
def test_llama_cpp_runs_byte_level_bpe_models(model_type, tmp_path):
    """Byte-level BPE (Phi-4-mini's and Qwen's kind): tokens, merges and the pre-tokenizer name let
    llama.cpp tokenize the sample chats as transformers does and generate its greedy tokens; the
    end-of-turn token is the template's (<|end|>, <|im_end|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Qwen2Config
    from philora.data import SAMPLE_EVAL
    regex, template, specials = BYTE_LEVEL[model_type]
    tok_dir = _byte_level_tokenizer(tmp_path / "tok", regex, template, specials)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    kw = dict(vocab_size=-(-len(tok) // 64) * 64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
              tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Phi3Config(original_max_position_embeddings=512, **kw) if model_type == "phi3" else Qwen2Config(**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    if model_type == "qwen2":  # nonzero q/k/v biases, which llama.cpp must add too
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "model")
    _copy_tokenizer(tok_dir, tmp_path / "model")
    path = export_gguf(tmp_path / "model", tmp_path / "out" / "m.gguf", outtype="f32")
    fields, _ = _read(path)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == {"qwen2": "qwen2", "phi3": "gpt-4o"}[model_type]
    assert fields["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids(specials[2])
    llm = _llama(path)
    chats = [json.loads(line)["messages"][:-1] for line in SAMPLE_EVAL.read_text().splitlines()[:20]]
    texts, ids = _prompts(tok, chats + [[{"role": "user", "content": "Ünïcödé 🦙 3.14159 don't\n\n  x"}]])
    for text, want in zip(texts, ids):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    assert _llama_greedy(llm, ids[0], 12) == _hf_greedy(model, ids[0], 12)[0]
