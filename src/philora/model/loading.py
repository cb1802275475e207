"""Load a causal LM and its tokenizer with transformers, ready for LoRA training or inference.

``name_or_path`` is a hub id (e.g. ``microsoft/Phi-3-mini-4k-instruct``), a local directory,
or ``tiny`` (the built-in tiny Phi-3, built offline on first use). ``trust_remote_code`` stays
off unless the config turns it on.

Sources: what ``philora generate / chat / eval / merge`` are pointed at, a philora run directory
or any PEFT adapter directory (base + adapter, unmerged), a merged or plain model directory, or
a model name, resolved in one place (:func:`resolve_source`, :func:`load_source`).
"""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..core.config import Config, ModelConfig, load_config
from ..core.errors import PhiloraError, first_line
from .adapter import CONFIG_NAME, AdapterError, read_adapter_config
from .devices import pick_device, resolve_dtype
from .gguf import resolve_gguf
from .inject import apply_adapter
from .prepare import attention, patch_loaded
from .quant import prepare_quantized, quantization_kwargs
from .tiny import resolve_model


RUN_CONFIG = "config.yaml"  # a philora run's config, in its output_dir (and each checkpoint)


def resolve_path(name_or_path: str) -> str:
    """A local directory for ``tiny`` (built on first use) and for a ``.gguf`` file (converted once,
    gguf.py, which says so in one line); ``pkg:PACKAGE/FILE`` is that file of an installed package;
    anything else as given. A command calls it once and passes the result on (as a model config's
    ``name_or_path``, or ``base=``): a resolved name resolves to itself, with no work and no line."""
    return resolve_model(resolve_gguf(name_or_path))


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None,
                   chat: bool = True):
    """The tokenizer at ``path``; the one tokenizer loader: any failure is a one-line PhiloraError.
    ``chat`` (training, generation): it must have a chat template, and gets a pad token (eos)
    where it has none; ``chat=False`` (merge, export): the tokenizer as it is saved."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise PhiloraError(f"cannot load tokenizer '{path}': {first_line(e)}") from None
    if chat and tok.pad_token is None:
        # Padding is never a label here (labels come from the chat template, -100 elsewhere),
        # so any existing token works as pad; eos is the conventional choice.
        tok.pad_token = tok.eos_token
    if chat and tok.chat_template is None:
        raise PhiloraError(f"tokenizer '{path}' has no chat template; use an instruct/chat model")
    return tok


def load_model_and_tokenizer(cfg: ModelConfig, device: Optional[torch.device] = None,
                             training: bool = True) -> Tuple[torch.nn.Module, object, str]:
    """(model on ``device``, tokenizer, resolved path). The model's weights are frozen; it has
    the changes every loaded model gets (prepare.py, steps 1-3: ``training`` for training's).
    ``cfg.name_or_path`` may be a path the command already resolved: it is used as it is."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    path = resolve_path(cfg.name_or_path)
    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = dict(dtype=dtype, attn_implementation=attention(cfg, path, training),
                  trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.quantization:
        kwargs.update(quantization_kwargs(cfg, device, path))
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise PhiloraError(f"cannot load model '{path}': {first_line(e)}") from None
    if cfg.quantization:
        # bitsandbytes repacks 4-bit weights on some CPUs at the first no-grad call, after which
        # the layer has no backward; prepare_quantized turns that off (and checks 4-bit happened).
        prepare_quantized(model)
    else:
        model.to(device)
    model.requires_grad_(False)
    patch_loaded(model, cfg, training)
    return model, tokenizer, path


def meta_model(name_or_path: str, local_only: bool = False) -> torch.nn.Module:
    """The model's module tree on the meta device (no weights, no memory). Raises PhiloraError."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(resolve_path(name_or_path), local_files_only=local_only)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as e:
        raise PhiloraError(f"cannot load base model config '{name_or_path}': {first_line(e)}") from None


# -- sources: runs, adapters, models ---------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """What to load: a (base) model, and an adapter directory to put on it, if any."""
    model_cfg: ModelConfig
    adapter_dir: Optional[Path] = None
    tokenizer_path: Optional[str] = None  # run directories carry the run's tokenizer
    run_cfg: Optional[Config] = None  # a philora run's config.yaml


def resolve_source(source: str, base: Optional[str] = None) -> Source:
    """Decide what ``source`` is; an adapter's base is ``base``, else the run's model, else the
    adapter's ``base_model_name_or_path``. Raises PhiloraError (one line)."""
    path = Path(source)
    if (path / CONFIG_NAME).is_file():
        adapter_cfg = read_adapter_config(path)
        run_cfg = load_config(str(path / RUN_CONFIG)) if (path / RUN_CONFIG).is_file() else None
        model_cfg = run_cfg.model if run_cfg else ModelConfig()
        name = base or (run_cfg.model.name_or_path if run_cfg else adapter_cfg.get("base_model_name_or_path"))
        if not name:
            raise AdapterError(f"{path / CONFIG_NAME}: no base_model_name_or_path; pass --base MODEL")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else None
        return Source(replace(model_cfg, name_or_path=name), path, tokenizer, run_cfg)
    if base:
        raise PhiloraError(f"--base is for adapters, and '{source}' is not an adapter directory "
                           f"(no {CONFIG_NAME})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise PhiloraError(f"{source}: not a run, adapter or model directory (no {CONFIG_NAME} or config.json)")
    if not path.exists() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise PhiloraError(f"{source}: no such directory")
    return Source(ModelConfig(name_or_path=source))


def load_source(source: str, base: Optional[str] = None, device: Optional[torch.device] = None):
    """(model in eval mode, tokenizer, Source): base + adapter unmerged, or a plain model. The
    Source's model config names the directory the base loaded from (a GGUF file's conversion, the
    tiny model's directory), so what loads the base again does not resolve it again."""
    src = resolve_source(source, base)
    device = device or pick_device()
    model, tokenizer, path = load_model_and_tokenizer(src.model_cfg, device, training=False)
    src = replace(src, model_cfg=replace(src.model_cfg, name_or_path=path))
    if src.tokenizer_path:
        tokenizer = load_tokenizer(src.tokenizer_path, src.model_cfg.trust_remote_code)
    if src.adapter_dir is not None:
        apply_adapter(model, src.adapter_dir)
    model.requires_grad_(False)
    return model.eval(), tokenizer, src
