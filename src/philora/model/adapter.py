"""LoRA adapters in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Written so that ``peft.AutoPeftModelForCausalLM.from_pretrained(dir)``, ``transformers``
(``model.load_adapter``) and vLLM load them unaided: keys are
``base_model.model.<module>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r), fused
module names (Phi-3's ``qkv_proj``) kept as they are.

PEFT has no per-slice LoRA, so a ``MergedLinear`` with k enabled slices is exported as one LoRA
on the fused module of rank r*k: the same ``lora_A`` and a block-diagonal ``lora_B`` (zero rows
for disabled slices), with ``rank_pattern`` / ``alpha_pattern`` making PEFT's scaling equal ours
(alpha*k / (r*k) = alpha / r; with rsLoRA alpha*sqrt(k) / sqrt(r*k) = alpha / sqrt(r)).

Reading goes the other way for any PEFT LoRA adapter (keys with or without the adapter name,
``rank_pattern`` / ``alpha_pattern`` with PEFT's matching rule, rsLoRA, ``fan_in_fan_out``
layers, ``bias`` tensors, DoRA's ``lora_magnitude_vector``). :func:`scan_adapter` lists every
problem instead of stopping at the first, so ``philora adapter check`` and the loaders share one
parser; what philora cannot represent (modules_to_save, other PEFT types, ...) is a one-line
:class:`AdapterError`.

DoRA (``use_dora``): each module also has ``<module>.lora_magnitude_vector`` (out,), PEFT's key;
its merged weight is ``m * (W + delta) / ||W + delta||`` per output row (:meth:`Adapter.merged_weight`).
Hand-written (not peft's ``save_pretrained`` / ``PeftModel``) because the layers are philora's.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import lora
from ..lora import MAGNITUDE  # DoRA's magnitude, PEFT's key
from ..core.config import PeftConfig
from ..core.errors import PhiloraError, first_line

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# PEFT LoRA options philora cannot represent: a truthy value makes the adapter unsupported.
UNSUPPORTED = {
    "modules_to_save": "modules_to_save (fully trained modules)",
    "lora_bias": "a bias on lora_B (lora_bias)", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer_replication", "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "use_qalora": "QALoRA", "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
}
# String inits that leave the base weights alone (as vLLM's list); PiSSA, OLoRA, CorDA, LoftQ
# change them, so such an adapter only works on a modified base model.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


class AdapterError(PhiloraError):
    """An adapter that cannot be read or does not fit the model; the message is one line."""


# -----------------------------------------------------------------------------
# writing

def block_diagonal(B: torch.Tensor, split_sizes: List[int], enabled: List[bool], r: int) -> torch.Tensor:
    """A per-slice lora_B (rows of the k enabled slices, r) as one plain LoRA's (out, r*k): the
    i-th enabled slice's rows in columns [i*r, (i+1)*r), zero elsewhere."""
    k = sum(enabled)
    out = B.new_zeros((sum(split_sizes), r * k))
    offset, row, i = 0, 0, 0
    for size, on in zip(split_sizes, enabled):
        if on:
            out[offset:offset + size, i * r:(i + 1) * r] = B[row:row + size]
            row, i = row + size, i + 1
        offset += size
    return out


def _peft_factors(layer) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (R, in), lora_B (out, R)) of a layer as one plain LoRA of rank R."""
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if getattr(layer, "enable_lora", None) is None:  # LoRA on the whole output (or not linear)
        return A.contiguous(), B.contiguous()
    return A.contiguous(), block_diagonal(B, layer.split_sizes, layer.enable_lora, layer.r)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def adapter_state(model) -> Tuple[Dict[str, torch.Tensor], Dict[str, int], Dict[str, float]]:
    """PEFT tensors plus {module: rank}, {module: alpha} for every LoRA layer of ``model``."""
    tensors, ranks, alphas = {}, {}, {}
    for name, layer in lora.lora_layers(model).items():
        A, B = _peft_factors(layer)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        if hasattr(layer, MAGNITUDE):  # DoRA: (out,), ||W|| on rows without LoRA
            tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.peft_magnitude()
        k = A.shape[0] // layer.r
        ranks[name] = A.shape[0]
        rs = getattr(layer, "use_rslora", False)
        alphas[name] = layer.lora_alpha * (math.sqrt(k) if rs else k)
    return tensors, ranks, alphas


def target_module_names(names: List[str], all_module_names: Optional[List[str]]) -> List[str]:
    """Short names ("qkv_proj") when they select exactly ``names`` among the model's modules
    (what vLLM and peft expect), else the full names. No model known: full names."""
    shorts = sorted({_short(n) for n in names})
    if all_module_names is not None:
        if {n for n in all_module_names if _short(n) in shorts} == set(names):
            return shorts
    return sorted(names)


def write_adapter(out_dir, tensors: Dict[str, torch.Tensor], ranks: Dict[str, int],
                  alphas: Dict[str, float], base_model_name_or_path: Optional[str], pc: PeftConfig,
                  target_modules: List[str], fan_in_fan_out: bool = False) -> Path:
    """Write PEFT tensors and an adapter_config.json for the LoRA options of ``pc``; modules
    whose rank is not ``pc.r`` go to rank_pattern / alpha_pattern (by short name when every
    module of that name agrees)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(ranks)
    rank_pattern = {n: v for n, v in ranks.items() if v != pc.r}
    alpha_pattern = {n: alphas[n] for n in rank_pattern}
    for short in sorted({_short(n) for n in names}):
        group = [n for n in rank_pattern if _short(n) == short]
        members = [n for n in names if _short(n) == short]
        if group and len(group) == len(members) and len({(rank_pattern[n], alpha_pattern[n]) for n in group}) == 1:
            rk, al = rank_pattern[group[0]], alpha_pattern[group[0]]
            for n in group:
                del rank_pattern[n], alpha_pattern[n]
            rank_pattern[short], alpha_pattern[short] = rk, al
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": pc.r, "lora_alpha": pc.lora_alpha, "lora_dropout": pc.lora_dropout,
        "target_modules": target_modules, "bias": pc.bias, "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": pc.use_rslora, "use_dora": pc.use_dora, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def save_adapter(model, out_dir, base_model_name_or_path: str, pc: PeftConfig) -> Path:
    """Write the PEFT adapter of ``model`` (trained with ``pc``) into ``out_dir``; returns it."""
    tensors, ranks, alphas = adapter_state(model)
    if not tensors:
        raise AdapterError("the model has no LoRA layers to save")
    layers = lora.lora_layers(model)
    if pc.bias != "none":
        for n, p in model.named_parameters():
            if p.requires_grad and n.endswith("bias") and "lora_" not in n:
                module = n[:-len(".bias")]  # peft wraps a LoRA layer's own bias as base_layer.bias
                key = f"{module}.base_layer.bias" if module in layers else n
                tensors[f"{PREFIX}{key}"] = p.detach()
    shorts = {_short(n) for n in ranks}
    linear = [n for n, m in model.named_modules() if _short(n) in shorts and hasattr(m, "weight")]
    fan_in_fan_out = any(getattr(m, "fan_in_fan_out", False) for m in layers.values())
    return write_adapter(out_dir, tensors, ranks, alphas, base_model_name_or_path, pc,
                         target_module_names(list(ranks), linear), fan_in_fan_out)


# -----------------------------------------------------------------------------
# reading

@dataclass
class Adapter:
    """A parsed PEFT LoRA adapter: {module: (lora_A (r, in), lora_B (out, r), alpha)}."""
    path: Path
    config: dict
    modules: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    biases: Dict[str, torch.Tensor] = field(default_factory=dict)  # parameter name -> tensor
    magnitudes: Dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module -> (out,)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def scaling(self, name: str) -> float:
        A, _, alpha = self.modules[name]
        r = A.shape[0]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def delta(self, name: str) -> torch.Tensor:
        """The update (out, in) of ``name`` in float32: B @ A * scaling (as PEFT)."""
        A, B, _ = self.modules[name]
        return (B.float() @ A.float()) * self.scaling(name)

    def merged_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base ``weight`` (out, in) of ``name`` with its update, in float32: W + delta, and
        with DoRA ``m * (W + delta) / ||W + delta||`` per output row (PEFT's merge)."""
        merged = weight.float() + self.delta(name)
        if name in self.magnitudes:
            norm = torch.linalg.norm(merged, dim=1)
            merged = merged * (self.magnitudes[name].float() / norm)[:, None]
        return merged


def read_adapter_config(adapter_dir) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter directory)") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read: {first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return config


def unsupported_features(config: dict) -> List[str]:
    """What in a PEFT config philora (and vLLM) cannot represent, as short descriptions."""
    found = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        found.append(f"init_lora_weights={init!r} (it changes the base weights; convert it to a "
                      f"plain LoRA with peft's path_initial_model_for_weight_conversion)")
    return found


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): a key matches a module whose name ends
    # with it (as a regex) at a "." boundary; the first matching key wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter_weights(adapter_dir) -> Dict[str, torch.Tensor]:
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").is_file():
            raise AdapterError(f"{path}: missing; adapter_model.bin (a pickle) is not loaded: "
                               f"re-save the adapter with safetensors")
        raise AdapterError(f"{path}: missing adapter weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
# As PEFT saves it (no adapter name, no ".weight") or as a live PeftModel's state dict has it.
DORA_KEY = re.compile(rf"^(?P<module>.+)\.{MAGNITUDE}(?:\.(?P<name>[^.]+)\.weight)?$")


def scan_adapter(adapter_dir) -> Tuple[Adapter, List[str]]:
    """Parse an adapter directory; returns the adapter and a list of one-line problems (empty
    when philora can load it). Unreadable files raise AdapterError."""
    path = Path(adapter_dir)
    config = read_adapter_config(path)
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} is not LORA")
    problems += [f"uses {what}, which philora cannot represent" for what in unsupported_features(config)]
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            problems.append(f"adapter_config.json has no numeric '{key}'")
    tensors = load_adapter_weights(path)
    adapter = Adapter(path, config)
    if problems:
        return adapter, problems
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    magnitudes: Dict[str, torch.Tensor] = {}
    names = set()
    for key, value in tensors.items():
        short_key = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = LORA_KEY.match(short_key)
        if m:
            factors.setdefault(m["module"], {})[m["which"]] = value
            names.add(m["name"])
        elif (dm := DORA_KEY.match(short_key)):
            magnitudes[dm["module"]] = value
            names.add(dm["name"])
        elif "lora_embedding_" in key:
            problems.append(f"tensor '{key}' is an embedding LoRA: philora supports linear layers only")
        elif "lora_" in key:
            problems.append(f"tensor '{key}' is not a plain LoRA weight (lora_A/lora_B .weight)")
        elif short_key.endswith(".bias"):  # bias != "none"; peft names a wrapped layer's base_layer
            adapter.biases[short_key.replace(".base_layer.bias", ".bias")] = value
        else:
            problems.append(f"tensor '{key}' is not a LoRA weight (modules_to_save or trainable tokens?)")
    if len(names) > 1:
        problems.append(f"holds several adapters ({', '.join(sorted(str(n) for n in names))}); keep one")
    for module, f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            missing = "lora_B" if "A" in f else "lora_A"
            problems.append(f"module '{module}' has no {missing} weight")
            continue
        A, B = f["A"], f["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            problems.append(f"module '{module}': lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                            f"do not chain (need (r, in) and (out, r))")
            continue
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if A.shape[0] != r:
            problems.append(f"module '{module}': lora_A has rank {A.shape[0]} but adapter_config "
                            f"says {r} (r / rank_pattern)")
            continue
        adapter.modules[module] = (A, B, float(alpha))
        if module in magnitudes:
            m = magnitudes[module]
            if not config.get("use_dora"):
                problems.append(f"module '{module}' has a DoRA magnitude vector ({MAGNITUDE}) but "
                                f"adapter_config.json says use_dora: false")
            elif m.shape != (B.shape[0],):
                problems.append(f"module '{module}': {MAGNITUDE} has shape {tuple(m.shape)}, lora_B "
                                f"needs ({B.shape[0]},)")
            else:
                adapter.magnitudes[module] = m
        elif config.get("use_dora"):
            problems.append(f"module '{module}' has no DoRA magnitude vector ({MAGNITUDE}) but "
                            f"adapter_config.json says use_dora: true")
    for module in sorted(set(magnitudes) - set(factors)):
        problems.append(f"tensor '{module}.{MAGNITUDE}' has no lora_A / lora_B beside it")
    if not factors and not problems:
        problems.append("has no LoRA weights: it would leave the base model unchanged")
    return adapter, problems


def read_adapter(adapter_dir, dora: bool = False) -> Adapter:
    """A PEFT LoRA adapter philora can load, or a one-line AdapterError naming the problem.
    A DoRA adapter only for callers that apply its magnitudes (``dora=True``: loading, merging);
    elsewhere (loralib conversion, GGUF LoRA) dropping them would change the model silently."""
    adapter, problems = scan_adapter(adapter_dir)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise AdapterError(f"{adapter_dir}: {problems[0]}{more}")
    if adapter.magnitudes and not dora:
        raise AdapterError(f"{adapter_dir}: a DoRA adapter (use_dora); this takes plain LoRA only, whose "
                           f"update is B @ A: merge it into its base first (philora merge)")
    return adapter
