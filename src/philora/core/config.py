"""Run configuration: frozen dataclasses loaded from YAML, with type-checked ``key=value`` overrides.

A config file has four sections: ``model``, ``data``, ``training_config`` and ``peft_config``.
Unknown keys and wrong types raise :class:`ConfigError` with a one-line message naming the key.
Hand-written (about 150 lines) rather than pulling in a schema library: the checks we need are
exactly "is this a known field" and "does the value fit the annotation".
"""

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from .errors import PhiloraError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class ConfigError(PhiloraError):
    """A user mistake in a config file or override; the message is one line."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"  # or "tiny": the built-in tiny Phi-3
    dtype: str = "auto"  # auto (bf16 on CUDA that supports it, else fp32) | float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | philora_sdpa (per-sequence, no mask) | flash_attention_2
    trust_remote_code: bool = False
    gradient_checkpointing: Union[bool, str] = False  # true | false | auto (on when a micro-batch would not fit: memory.py)
    revision: Optional[str] = None
    quantization: Optional[str] = None  # nf4 | fp4 (QLoRA: 4-bit base through bitsandbytes)
    double_quant: bool = True
    compute_dtype: str = "auto"  # dtype of 4-bit matmuls and of LoRA's input


@dataclass(frozen=True)
class DataSource:
    """One source of a mixture: ``data.train: [{path: a.jsonl, weight: 2}, {path: b.jsonl, weight: 0.5}]``."""
    path: str  # as data.train: a file, a hub dataset name, or "sample"
    weight: float = 1.0  # each epoch sees each of its examples `weight` times on average
    format: Optional[str] = None  # None: data.format
    split: Optional[str] = None  # None: data.train_split (data.eval_split for eval sources)


@dataclass(frozen=True)
class DataConfig:
    train: Union[str, List[DataSource]] = "sample"  # a .jsonl/.json/.parquet/.csv file, a hub dataset name, "sample", or a list of sources
    eval: Union[None, str, List[DataSource]] = None
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = 0.05  # held out of train when no eval set is given
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt_completion
    max_length: int = 2048
    truncation: str = "truncate"  # truncate | drop: what to do with over-long conversations
    skip_bad_records: bool = False  # skip (and count) bad records instead of stopping
    packing: bool = True  # padding-free: several conversations per row, attention kept apart
    shuffle: bool = True
    num_proc: int = 0  # tokenizing processes (0: one per CPU core); the result is the same for any number
    cache_dir: Optional[str] = None  # tokenized data (Arrow); None: $PHILORA_CACHE/data or ~/.cache/philora/data


@dataclass(frozen=True)
class TrainingConfig:
    output_dir: str = "runs/phi3-lora"
    learning_rate: float = 2e-4
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int = 100  # 0: only before the first step and at the end
    save_steps: int = 100  # 0: only the final adapter
    save_total_limit: int = 2
    eval_max_samples: int = 0  # 0: the whole eval set
    report_samples: int = 8  # held-out prompts generated for the end-of-run report (0: none)
    fsdp: bool = False  # FullyShardedDataParallel instead of DDP under torchrun
    progress_bar: bool = True
    neftune_noise_alpha: Optional[float] = None  # NEFTune: uniform noise on input embeddings, training only
    report_to: Union[str, List[str]] = field(default_factory=lambda: ["tensorboard"])  # + mlflow, wandb, trackio; none, all
    eval_generations: int = 0  # greedy replies to this many eval prompts at every evaluation
    # A step whose loss or gradient norm is NaN/inf is skipped (no update) with a warning; this
    # many in a row stop the run with an error (1: stop at the first).
    max_bad_steps: int = 5
    # Preference tuning (data: {prompt, chosen, rejected} pairs); the other keys as TRL names them.
    objective: str = "sft"  # sft | dpo | orpo | simpo
    beta: float = 0.1  # DPO's beta; ORPO's lambda; SimPO's beta (the paper uses 2 to 10)
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo
    label_smoothing: float = 0.0  # simpo only (TRL 1.16's DPO sigmoid and ipo ignore it)
    simpo_gamma: float = 0.5  # SimPO's target margin
    cpo_alpha: float = 1.0  # simpo: weight of the NLL on chosen completions (0: the paper's SimPO)


@dataclass(frozen=True)
class PeftConfig:
    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    bias: str = "none"  # none | all | lora_only
    target_modules: Union[str, List[str]] = "all-linear"
    # Per-slice LoRA on fused modules: {module name: [slice names]}, e.g. {"qkv_proj": ["q", "v"]}.
    fused_slices: Dict[str, List[str]] = field(default_factory=dict)
    use_rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    use_dora: bool = False  # DoRA: a trained magnitude per output row (dora.py)
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: lora_B's learning rate = ratio x lora_A's
    init_adapter: Optional[str] = None  # a PEFT adapter or finished philora run directory: the LoRA starts from it


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training_config: TrainingConfig = field(default_factory=TrainingConfig)
    peft_config: PeftConfig = field(default_factory=PeftConfig)


CHOICES = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.gradient_checkpointing": (False, True, "auto"),
    "model.attn_implementation": ("eager", "sdpa", "philora_sdpa", "flash_attention_2"),
    "model.quantization": (None, "nf4", "fp4"),
    "model.compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.format": ("auto", "messages", "sharegpt", "alpaca", "prompt_completion"),
    "data.truncation": ("truncate", "drop"),
    "training_config.lr_scheduler_type": ("cosine", "linear", "constant"),
    "peft_config.bias": ("none", "all", "lora_only"),
    "training_config.objective": ("sft", "dpo", "orpo", "simpo"),
    "training_config.loss_type": ("sigmoid", "ipo"),
}


REPORT_TO = ("tensorboard", "mlflow", "wandb", "trackio", "none", "all")  # as transformers' report_to

# Values a type cannot rule out: key -> (test, what it must be).
RANGES = {
    "data.max_length": (lambda v: v >= 2, ">= 2"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.num_proc": (lambda v: v >= 0, ">= 0 (0: one per CPU core)"),
    "training_config.learning_rate": (lambda v: v > 0, "> 0"),
    "training_config.num_train_epochs": (lambda v: v > 0, "> 0"),
    "training_config.per_device_train_batch_size": (lambda v: v >= 1, ">= 1"),
    "training_config.per_device_eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "training_config.gradient_accumulation_steps": (lambda v: v >= 1, ">= 1"),
    "training_config.warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "training_config.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "training_config.weight_decay": (lambda v: v >= 0, ">= 0"),
    "training_config.adam_beta1": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training_config.adam_beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "training_config.adam_epsilon": (lambda v: v > 0, "> 0 (0 divides by zero in Adam)"),
    "training_config.max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "training_config.logging_steps": (lambda v: v >= 1, ">= 1"),
    "training_config.eval_steps": (lambda v: v >= 0, ">= 0"),
    "training_config.save_steps": (lambda v: v >= 0, ">= 0"),
    "training_config.save_total_limit": (lambda v: v >= 0, ">= 0 (0: keep all)"),
    "training_config.eval_max_samples": (lambda v: v >= 0, ">= 0"),
    "training_config.report_samples": (lambda v: v >= 0, ">= 0"),
    "peft_config.r": (lambda v: v >= 1, ">= 1"),
    "peft_config.lora_alpha": (lambda v: v > 0, "> 0"),
    "peft_config.lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "peft_config.loraplus_lr_ratio": (lambda v: v is None or v > 0, "> 0 (or null: no LoRA+)"),
    "training_config.neftune_noise_alpha": (lambda v: v is None or v > 0, "> 0 (or null: no NEFTune)"),
    "training_config.eval_generations": (lambda v: v >= 0, ">= 0"),
    "training_config.report_to": (lambda v: all(t in REPORT_TO for t in ([v] if isinstance(v, str) else v)),
                                  f"one or a list of {', '.join(REPORT_TO)}"),
    "training_config.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "training_config.beta": (lambda v: v > 0, "> 0"),
    "training_config.label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "training_config.simpo_gamma": (lambda v: v >= 0, ">= 0"),
    "training_config.cpo_alpha": (lambda v: v >= 0, ">= 0"),
}
# Keys that apply to one objective only: set otherwise (not their default), they are an error.
OBJECTIVE_ONLY = {"training_config.loss_type": ("dpo", "sigmoid"), "training_config.label_smoothing": ("simpo", 0.0)}

# Keys a --resume may change: they do not change the weights a run trains (the split of the
# global batch into processes x batch x accumulation is checked on its own: the product must
# stay). RESUME_APPLIED: the run's length may change too (train longer), applied and logged; the
# learning-rate schedule follows the new length from the checkpoint's step on. A resume that
# changes any other key is refused with the list of changes.
RESUME_APPLIED = {"training_config.max_steps", "training_config.num_train_epochs"}
RESUME_FREE = {
    "training_config.output_dir", "training_config.per_device_train_batch_size",
    "training_config.gradient_accumulation_steps", "training_config.per_device_eval_batch_size",
    "training_config.logging_steps", "training_config.eval_steps", "training_config.save_steps",
    "training_config.save_total_limit", "training_config.eval_max_samples",
    "training_config.report_samples", "training_config.progress_bar", "training_config.fsdp",
    "training_config.max_bad_steps", "model.gradient_checkpointing", "data.num_proc", "data.cache_dir",
    "training_config.report_to", "training_config.eval_generations",
    "model.attn_implementation",  # the same attention computed another way (e.g. resumed on other hardware)
}


def check_values(cfg: "Config", where: str = "config") -> None:
    """Range checks (batch sizes >= 1, dropout in [0, 1), ...); ConfigError names the key."""
    for key, (ok, what) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{where}: '{key}' must be {what}, got {value!r}")
    objective = cfg.training_config.objective
    for key, (only, default) in OBJECTIVE_ONLY.items():
        value = getattr(cfg.training_config, key.split(".")[1])
        if value != default and objective != only:
            raise ConfigError(f"{where}: '{key}' applies to training_config.objective {only} only, "
                              f"got {value!r} with objective {objective}")
    targets = cfg.peft_config.target_modules
    if isinstance(targets, str) and targets != "all-linear":  # a regex, as in PEFT
        try:
            re.compile(targets)
        except re.error as e:
            raise ConfigError(f"{where}: 'peft_config.target_modules' is not a valid regular "
                              f"expression: {e}") from None
    for name in ("train", "eval"):  # the sources of a mixture
        sources = getattr(cfg.data, name)
        if isinstance(sources, list) and not sources:
            raise ConfigError(f"{where}: 'data.{name}' is an empty list of sources")
        for i, s in enumerate(sources if isinstance(sources, list) else [], 1):
            if not s.weight > 0:
                raise ConfigError(f"{where}: 'data.{name}[{i}].weight' must be > 0, got {s.weight!r}")
            if s.format is not None and s.format not in CHOICES["data.format"]:
                raise ConfigError(f"{where}: 'data.{name}[{i}].format' must be one of "
                                  f"{list(CHOICES['data.format'])}, got {s.format!r}")


def _type_ok(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if dataclasses.is_dataclass(tp):  # a mapping, checked key by key when built
        return isinstance(value, (dict, tp))
    if origin is Union:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List):
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict) and all(
            _type_ok(k, args[0]) and _type_ok(v, args[1]) for k, v in value.items())
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _build(cls, data: Any, where: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{where}: unknown key '{full}' (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, where, f"{full}.")
            continue
        item = _item_class(tp)
        if item is not None and isinstance(value, list):  # e.g. data.train: a list of DataSource
            kwargs[key] = [_build(item, v, where, f"{full}[{i}].") for i, v in enumerate(value, 1)]
            continue
        if isinstance(value, int) and not isinstance(value, bool) and tp is float:
            value = float(value)
        if isinstance(value, str) and tp is float:  # PyYAML (YAML 1.1) reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}: '{full}' must be {_type_name(tp)}, got {value!r}")
        if full in CHOICES and value not in CHOICES[full]:
            raise ConfigError(f"{where}: '{full}' must be one of {list(CHOICES[full])}, got {value!r}")
        kwargs[key] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: '{prefix}{missing[0]}' is required")
    return cls(**kwargs)


def _item_class(tp: Any) -> Any:
    """The dataclass D of a field typed ``List[D]`` (or a Union holding one), else None."""
    for t in (tp, *typing.get_args(tp)):
        args = typing.get_args(t)
        if typing.get_origin(t) in (list, List) and args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _parse_value(text: str) -> Any:
    # YAML scalars/lists/maps: "1e-4" -> float, "[q, v]" -> list, "null" -> None, "true" -> bool.
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads 1e-4 as a string (YAML 1.1); accept it as a number
        try:
            return float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            return value
    return value


def _declared_type(parts: List[str]) -> Any:
    """The annotation of ``section.key`` in :class:`Config`, or None for an unknown key."""
    tp: Any = Config
    for p in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if p not in hints:
            return None
        tp = hints[p]
    return tp


def apply_overrides(raw: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings to a raw (dict) config; types are checked later."""
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty section in the file ("peft_config:")
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        value = _parse_value(text)
        tp = _declared_type(parts)
        # A string key keeps the text as written: output_dir=2024, revision=1234567, train=true.
        if tp is not None and not _type_ok(value, tp) and _type_ok(text, tp):
            value = text
        node[parts[-1]] = value
    return raw


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Load ``path`` (default: the built-in tiny config) and apply ``overrides``."""
    path = str(path) if path else str(CONFIG_DIR / "tiny.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    where = path
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, "
                          f"training_config, peft_config), got a {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
        where = f"{path} (with overrides)"
    cfg = _build(Config, raw, where, "")
    check_values(cfg, where)
    return cfg


def config_to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
