"""``philora export gguf``: a run (base + adapter) or a model directory as one GGUF file, the format
llama.cpp, Ollama and LM Studio run on laptops and phones, with an Ollama ``Modelfile`` beside it.

A run is merged first (``philora.merge``, in float32, into a temporary directory next to the
output), so the file holds what was trained; ``--adapter-only`` writes the LoRA alone as a GGUF
adapter (llama.cpp ``--lora``, Ollama ``ADAPTER``). Tensors, names and hyper-parameters follow
what llama.cpp's ``convert_hf_to_gguf.py`` writes for Phi-3 (fused qkv / gate_up, LongRoPE factors,
partial rotary, sliding window, tied embeddings), Llama / Mistral (q/k rows permuted to llama.cpp's
rotary layout) and Qwen2, through the ``gguf`` library of the llama.cpp project. What a runner needs
to chat and to stop travels in the file (chat template, bos/eos/pad, the end-of-turn token as
``tokenizer.ggml.eot_token_id``; see ``export_vocab``) and in the Modelfile (``export_ollama``).
Tensors stream one at a time, so memory stays at one tensor beyond the merge. f32/f16/bf16/q8_0 are
written here; other llama.cpp types (q4_k_m, ...) are quantized by llama-cpp-python from bf16.
Hand-written because llama.cpp's converter is a script (not a library) that cannot take a run.
"""

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..core.diskio import guard_output
from ..core.errors import PhiloraError
from ..model.adapter import read_adapter
from ..model.families import head_dim, kv_heads
from ..model.loading import load_tokenizer, resolve_path, resolve_source
from ..use.merge import merge
from .ollama import modelfile_path, write_modelfile
from .toolparser import served_template
from .vocab import add_vocab, build_vocab, end_of_turn

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
ARCHS = {"phi3": "PHI3", "llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
PERMUTED = ("LLAMA",)  # HF's q/k rows are in rotate_half order; llama.cpp's LLAMA rope wants pairs


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PhiloraError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def _types(outtype: str):
    gguf = _gguf()
    Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (F.ALL_F32, Q.F32), "f16": (F.MOSTLY_F16, Q.F16), "bf16": (F.MOSTLY_BF16, Q.BF16),
            "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0)}[outtype]


def _llama_cpp_ftype(outtype: str):
    """llama.cpp's file type for quantizations only llama.cpp itself can do (q4_k_m, ...)."""
    try:
        import llama_cpp
    except ImportError:
        raise PhiloraError(f"--outtype {outtype} needs llama-cpp-python (pip install llama-cpp-python); "
                           f"without it choose one of {', '.join(OUTTYPES)}") from None
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{outtype.upper()}", None)
    if ftype is None:
        raise PhiloraError(f"--outtype {outtype!r} is not a llama.cpp type; use {', '.join(OUTTYPES)}, "
                           f"q4_k_m, q5_k_m, q6_k, q4_0, ...")
    return llama_cpp, ftype


# -----------------------------------------------------------------------------
# hyper-parameters

def _rope(hf) -> dict:
    rp = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    rp = dict(rp.get("full_attention", rp))
    rp.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rp.setdefault("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0)
    rp.setdefault("original_max_position_embeddings",
                  getattr(hf, "original_max_position_embeddings", None) or hf.max_position_embeddings)
    return rp


def _hparams(w, arch: str, hf, raw: dict) -> Dict[str, np.ndarray]:
    """Write the architecture's keys; returns extra tensors (RoPE factors) it needs."""
    gguf, rp, extra = _gguf(), _rope(hf), {}
    w.add_context_length(hf.max_position_embeddings)
    w.add_embedding_length(hf.hidden_size)
    w.add_feed_forward_length(hf.intermediate_size)
    w.add_block_count(hf.num_hidden_layers)
    w.add_head_count(hf.num_attention_heads)
    w.add_head_count_kv(kv_heads(hf))
    w.add_layer_norm_rms_eps(hf.rms_norm_eps)
    w.add_rope_freq_base(rp["rope_theta"])
    rope_type = str(rp.get("rope_type") or rp.get("type") or "default").lower()
    if arch == "PHI3":
        rope_dims = int(rp["partial_rotary_factor"] * head_dim(hf))
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(getattr(hf, "sliding_window", None) or 0)  # 0: none (Phi-4)
        if rope_type in ("longrope", "su"):
            long, short = rp.get("long_factor"), rp.get("short_factor")
            if not long or not short or len(long) != rope_dims // 2 or len(short) != rope_dims // 2:
                raise PhiloraError(f"config.json: LongRoPE needs long_factor and short_factor of "
                                   f"{rope_dims // 2} values each")
            scale = hf.max_position_embeddings / rp["original_max_position_embeddings"]
            attn = rp.get("attention_factor") or (
                math.sqrt(1 + math.log(scale) / math.log(rp["original_max_position_embeddings"])) if scale > 1 else 1.0)
            w.add_rope_scaling_attn_factors(attn)
            for key, factors in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short)):
                extra[gguf.TENSOR_NAMES[key] + ".weight"] = np.asarray(factors, dtype=np.float32)
            return extra
    else:
        if arch == "LLAMA":
            w.add_vocab_size(hf.vocab_size)
            w.add_rope_dimension_count(head_dim(hf))
        if "head_dim" in raw:
            w.add_key_length(raw["head_dim"])
            w.add_value_length(raw["head_dim"])
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rp["factor"])
        elif rope_type == "llama3":
            extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = _llama3_factors(hf, rp)
            return extra
    if rope_type not in ("default", "longrope", "su", "linear"):
        raise PhiloraError(f"config.json: RoPE type {rope_type!r} is not supported for GGUF export")
    return extra


def _llama3_factors(hf, rp) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE scaling, as llama.cpp's rope_freqs tensor."""
    dim = head_dim(hf)
    freqs = 1.0 / (rp["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# -----------------------------------------------------------------------------
# tensors

def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows (halves per head) to llama.cpp's interleaved pairs (as its converter)."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _model_tensors(model_dir: Path) -> Iterator[Tuple[str, tuple, object]]:
    """(name, shape, loader) for every tensor of the safetensors checkpoint in ``model_dir``."""
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    if not (model_dir / files[0]).is_file():
        raise PhiloraError(f"{model_dir}: no model.safetensors (only safetensors checkpoints are exported)")
    for f in files:
        with safe_open(str(model_dir / f), framework="pt") as st:
            for name in st.keys():
                yield name, tuple(st.get_slice(name).get_shape()), (lambda p=model_dir / f, n=name: _load(p, n))


def _load(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as st:
        return st.get_tensor(name)


def _qtype(name: str, shape, want):
    """The stored type of a tensor: norms, biases and 1-D tensors stay F32, as in llama.cpp's converter;
    a row length the block size does not divide falls back to F16."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith((".weight", ".lora_a", ".lora_b")):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    return Q.F16 if block > 1 and shape[-1] % block else want


def _plan(w, name: str, shape, qtype) -> None:
    gguf = _gguf()
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize, raw_dtype=qtype)
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)


def _stream(w, out: Path, items: List[Tuple[str, tuple, object]], want) -> None:
    """Write the file: header, metadata, tensor infos, then each tensor loaded and converted in turn."""
    gguf = _gguf()
    w.write_header_to_file(path=out)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, load in items:
        w.write_tensor_data(gguf.quants.quantize(load().float().numpy(), _qtype(name, shape, want)))
    w.close()


def _name(source: Path, tok) -> str:
    """general.name. llama.cpp gives special tokens Phi-3's right-strip (the whitespace after
    <|user|> etc. is dropped) only when the name holds "phi3" or "phi-3", whatever the architecture;
    so the name says so exactly when the tokenizer's special tokens strip."""
    name = source.name or "model"
    rstrip = any(t.rstrip for t in tok.added_tokens_decoder.values() if t.special)
    has = "phi3" in name.lower() or "phi-3" in name.lower()
    if rstrip and not has:
        name += " (phi-3)"
    elif has and not rstrip:
        name = name.lower().replace("phi-3", "phi_3").replace("phi3", "phi_3")
    return name


def _config(model_dir: Path):
    from transformers import AutoConfig
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = ARCHS.get(raw.get("model_type"))
    if arch is None:
        raise PhiloraError(f"{model_dir / 'config.json'}: model_type {raw.get('model_type')!r} is not supported "
                           f"for GGUF export (supported: {', '.join(ARCHS)})")
    return raw, arch, AutoConfig.from_pretrained(str(model_dir))


def write_model(model_dir: Path, out: Path, outtype: str, name_from: Path, tools_shape: str = "flat"):
    """Write the HF model in ``model_dir`` (safetensors) as a GGUF file, its chat template as a server
    renders a request's tools with as trained (toolparser.served_template, ``tools_shape``: the data's
    tools' shape); returns its HF tokenizer."""
    gguf = _gguf()
    raw, arch, hf = _config(model_dir)
    ftype, want = _types(outtype)
    tok = load_tokenizer(str(model_dir), chat=False)
    vocab = build_vocab(model_dir, hf.vocab_size, tok)
    vocab.chat_template = served_template(vocab.chat_template, tools_shape)
    if vocab.chat_template != tok.chat_template:
        print(f"chat template: the model's own behind a preamble putting a request's tools onto the system "
              f"message as trained ({tools_shape} JSON; servers drop a message's tools, it reads them nowhere else)")
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    extra = _hparams(w, arch, hf, raw)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], hf.num_hidden_layers)
    n_head, n_kv = hf.num_attention_heads, kv_heads(hf)
    items = [(n, a.shape, (lambda a=a: torch.from_numpy(a))) for n, a in extra.items()]
    for hf_name, shape, load in _model_tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq") or (hf_name == "lm_head.weight" and hf.tie_word_embeddings):
            continue  # llama.cpp computes the one and reuses token_embd for the other
        new = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise PhiloraError(f"{model_dir}: tensor '{hf_name}' has no GGUF name for {arch.lower()}")
        if arch in PERMUTED and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
            heads = n_head if ".q_proj." in hf_name else n_kv
            load = (lambda f=load, h=heads: _permute(f(), h))
        items.append((new, shape, load))
    for n, shape, _ in items:
        _plan(w, n, shape, _qtype(n, shape, want))
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(_name(name_from, tok))
    w.add_size_label(gguf.size_label(*w.get_total_parameter_count()))
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, vocab)
    _stream(w, out, items, want)
    return tok


def write_adapter(adapter, base_dir: Path, out: Path, outtype: str) -> None:
    """The LoRA as a llama.cpp adapter GGUF. Each module's scaling is folded into lora_b and
    adapter.lora.alpha is 0 (llama.cpp then scales by 1), which holds for any rank/alpha pattern."""
    gguf = _gguf()
    raw, arch, hf = _config(base_dir)
    if adapter.biases:
        raise PhiloraError(f"{adapter.path}: the adapter trains biases, which a GGUF adapter cannot hold; "
                           f"export the merged model instead (without --adapter-only)")
    _, want = _types(outtype)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], hf.num_hidden_layers)
    n_head, n_kv = hf.num_attention_heads, kv_heads(hf)
    w = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
    items = []
    for module, (A, B, _) in sorted(adapter.modules.items()):
        new = tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        if new is None or new.startswith(("token_embd", "output.")) and hf.tie_word_embeddings:
            raise PhiloraError(f"{adapter.path}: LoRA on '{module}' has no place in a llama.cpp adapter")
        B = B.float() * adapter.scaling(module)
        if arch in PERMUTED and module.endswith(("q_proj", "k_proj")):
            B = _permute(B, n_head if module.endswith("q_proj") else n_kv)
        for suffix, t in ((".lora_a", A.float()), (".lora_b", B)):
            items.append((new + suffix, tuple(t.shape), (lambda t=t: t)))
    for n, shape, _ in items:
        _plan(w, n, shape, _qtype(n, shape, want))
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    w.add_name(adapter.path.name)
    _stream(w, out, items, want)


def _quantize(llama_cpp, ftype, src: Path, out: Path, outtype: str) -> None:
    """llama.cpp's own quantizer (its per-tensor log goes to a file; its last line names a failure)."""
    import ctypes
    import os
    import sys
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            failed = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        if failed:
            log.seek(0)
            lines = [x for x in log.read().decode(errors="replace").splitlines() if x.strip()]
            raise PhiloraError(f"llama.cpp could not quantize the model to {outtype}: {(lines or ['no message'])[-1]}")


# -----------------------------------------------------------------------------
# the command

def _check_out(out, force: bool) -> Path:
    """The GGUF file and the Modelfile written beside it, checked as every output is."""
    out = guard_output(out, force, directory=False)
    guard_output(modelfile_path(out), force, directory=False, name="Modelfile")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _tokenizer_model(merged: Path, src, base_path: str) -> None:
    """A merge writes fast-tokenizer files only; SentencePiece's tokenizer.model (Phi-3's real
    vocabulary, scores and types) comes from the run or the base model when it is missing."""
    if (merged / "tokenizer.model").is_file():
        return
    for d in (src.tokenizer_path, src.adapter_dir, base_path):
        if d and (Path(d) / "tokenizer.model").is_file():
            shutil.copy(Path(d) / "tokenizer.model", merged / "tokenizer.model")
            return


def export_gguf(source, out, outtype: str = "f16", force: bool = False, adapter_only: bool = False,
                base: Optional[str] = None, tools_shape: str = "flat") -> Path:
    """Export ``source`` (a philora run / PEFT adapter directory, or a model directory) to the GGUF
    file ``out`` and write an Ollama ``Modelfile`` beside it; returns ``out``. A chat template that reads
    tools only from the system message goes in behind toolparser's preamble (``tools_shape``)."""
    llama_cpp = ftype = None
    if outtype not in OUTTYPES:
        if adapter_only:
            raise PhiloraError(f"--adapter-only takes --outtype {', '.join(OUTTYPES)}; got {outtype!r}")
        llama_cpp, ftype = _llama_cpp_ftype(outtype)
    _gguf()
    src = resolve_source(str(source), base)
    if src.adapter_dir is not None and src.model_cfg.quantization:
        raise PhiloraError(f"{source}: a QLoRA run (base quantized to {src.model_cfg.quantization}) is not exported "
                           f"as it is; run 'philora merge {source} --out DIR' (it merges into the dequantized "
                           f"base) and export DIR")
    base_path = Path(resolve_path(src.model_cfg.name_or_path))
    if not (base_path / "config.json").is_file():
        raise PhiloraError(f"{source}: not a run, adapter or model directory (GGUF export needs local files)")
    if adapter_only and src.adapter_dir is None:
        raise PhiloraError(f"--adapter-only: '{source}' is a model, not a run or adapter directory")
    _config(base_path)  # an unsupported architecture fails before any merge
    out = _check_out(out, force)
    part = out.with_name(out.name + ".part")
    try:
        modelfile = _export(source, src, base_path, out, part, outtype, adapter_only, llama_cpp, ftype, tools_shape)
    finally:
        part.unlink(missing_ok=True)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {outtype}{', LoRA adapter' if adapter_only else ''}) and {modelfile}")
    return out


def _export(source, src, base_path: Path, out: Path, part: Path, outtype: str, adapter_only: bool,
            llama_cpp, ftype, shape: str) -> Path:
    with tempfile.TemporaryDirectory(prefix=".philora-export-", dir=out.parent) as tmp:
        if adapter_only:
            write_adapter(read_adapter(src.adapter_dir), base_path, part, outtype)
            model_dir, tok = base_path, load_tokenizer(str(src.tokenizer_path or base_path), chat=False)
        else:
            model_dir = base_path
            if src.adapter_dir is not None:
                # the base resolved above, passed on: a GGUF base is not hashed (nor said) again
                model_dir = merge(str(source), Path(tmp) / "merged", base=str(base_path), dtype="float32")
                _tokenizer_model(model_dir, src, str(base_path))
            name_from = Path(source) if src.adapter_dir is not None else base_path
            if llama_cpp is None:
                tok = write_model(model_dir, part, outtype, name_from, shape)
            else:  # llama.cpp quantizes from a bf16 file (no precision lost for bf16 bases)
                tok = write_model(model_dir, Path(tmp) / "bf16.gguf", "bf16", name_from, shape)
                _quantize(llama_cpp, ftype, Path(tmp) / "bf16.gguf", part, outtype)
        modelfile = write_modelfile(out, model_dir, tok, end_of_turn(tok),
                                    base_from=str(base_path.resolve()) if adapter_only else None)
        part.replace(out)
    return modelfile
