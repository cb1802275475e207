"""Tiny models and runs for the GGUF export tests (test_export_gguf*.py).

A pytest plugin, registered by conftest.py's ``pytest_plugins`` (test files never import it):
session fixtures ``phi3_base`` (a tiny Phi-3 with the real Phi-3 tokenizer, fitted to CHATS so its
greedy replies have clear winners), ``phi3_run`` (a philora run on it: LoRA on every linear layer,
rank and alpha patterns), ``phi3_merged`` (that run merged), and ``gguf_models``: the builders and
a GGUF reader (``gguf_models.read(path)`` -> metadata fields, {tensor: (type, shape, bytes)}).
"""

import json
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

PHI3_TOKENIZER = Path(__file__).resolve().parent / "fixtures" / "phi3-tokenizer"
CHATS = [
    [{"role": "user", "content": "What is 17 plus 25?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]
REPLIES = ["17 plus 25 is 42.", "Blue.", "Waves fold on the shore,\nsalt wind carries gull voices,\nthe tide keeps its time."]


def tiny_phi3(out: Path, tokenizer_dir: Path, longrope=False, seed=0) -> Path:
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
    copy_tokenizer(tokenizer_dir, out)
    return out


def fit(model_dir: Path, steps=25) -> Path:
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


def tiny_llama(out: Path, tokenizer_dir: Path) -> Path:
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
    copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(src: Path, out: Path) -> None:
    for f in Path(src).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, out / f.name)


def linear_names(model_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def make_run(run: Path, base: Path, quantization=None, seed=3, scale_b=0.02) -> Path:
    """A philora run directory (config.yaml, PEFT adapter, the run's tokenizer) with LoRA on every
    linear layer; qkv / q_proj get another rank and alpha (rank_pattern, alpha_pattern), so one
    adapter-wide alpha could not express the scaling."""
    from philora.core.config import Config, ModelConfig, save_config
    run.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors, special = {}, r"(qkv_proj|q_proj)"
    for name, m in linear_names(base).items():
        r = 8 if re.search(special + "$", name) else 4
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * scale_b
    save_file(tensors, str(run / "adapter_model.safetensors"))
    (run / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "r": 4,
        "lora_alpha": 8, "rank_pattern": {special: 8}, "alpha_pattern": {special: 24}, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in linear_names(base)}), "use_rslora": False}))
    model_cfg = ModelConfig(name_or_path=str(base), **({"quantization": quantization} if quantization else {}))
    save_config(Config(model=model_cfg), run / "config.yaml")
    copy_tokenizer(base, run)
    return run


def read(path: Path):
    """A GGUF file's metadata fields (without GGUF.*) and {tensor: (type, shape, bytes)}."""
    import gguf
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, [int(s) for s in t.shape], np.asarray(t.data).tobytes()) for t in r.tensors}
    return fields, tensors


@pytest.fixture(scope="session")
def phi3_base(tmp_path_factory):
    return fit(tiny_phi3(tmp_path_factory.mktemp("phi3") / "phi3-mini-tiny", PHI3_TOKENIZER))


@pytest.fixture(scope="session")
def phi3_run(phi3_base, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "chat-run", phi3_base)


@pytest.fixture(scope="session")
def phi3_merged(phi3_run, tmp_path_factory):
    from philora.use.merge import merge
    return merge(str(phi3_run), tmp_path_factory.mktemp("merged") / "m", dtype="float32")


@pytest.fixture(scope="session")
def gguf_models():
    """The builders and the GGUF reader above, for the test files."""
    return types.SimpleNamespace(PHI3_TOKENIZER=PHI3_TOKENIZER, CHATS=CHATS, REPLIES=REPLIES, tiny_phi3=tiny_phi3,
                                 fit=fit, tiny_llama=tiny_llama, copy_tokenizer=copy_tokenizer, make_run=make_run,
                                 read=read)
