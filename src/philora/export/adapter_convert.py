"""``philora adapter convert``: loralib checkpoints to PEFT adapters and back.

loralib checkpoints are ``<module>.lora_A`` / ``.lora_B`` state dicts; loralib stores neither r
nor alpha. A loralib ``MergedLinear`` (a fused projection with LoRA on k of its slices, A (r*k,
in), B (rows of those slices, r)) becomes one PEFT LoRA of rank r*k with a block-diagonal lora_B
and alpha*k (scaling alpha*k / (r*k) = alpha / r), as philora's own adapters are saved; going
back, the block structure is read off lora_B. Which slices a MergedLinear enabled is not in a
loralib checkpoint: it comes from the base model's fused-slice table when only one choice fits,
else from ``enable_lora``. Hand-written because no library converts between the two formats.
"""

import itertools
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from ..core.config import PeftConfig
from ..core.errors import PhiloraError, first_line
from ..model.adapter import PREFIX, block_diagonal, read_adapter, target_module_names, write_adapter
from ..model.families import fused_slices, is_conv1d, linear_shape
from ..model.inject import linear_names, target_layer
from ..model.loading import meta_model

LORALIB_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])$")


def _slice_layout(model, name: str, enable_lora: Optional[Dict[str, Sequence[bool]]],
                  out_features: Optional[int]) -> Optional[Tuple[List[int], List[bool]]]:
    """(slice sizes, enabled) of a fused module: from ``enable_lora`` (keyed by module name or
    its last part) with the model's slice sizes or equal slices, else the model's table alone."""
    table = fused_slices(model.config, name) if model is not None else None
    given = (enable_lora or {}).get(name, (enable_lora or {}).get(name.rsplit(".", 1)[-1]))
    if given is not None:
        given = [bool(e) for e in given]
        if table and len(table[1]) == len(given):
            return list(table[1]), given
        if out_features is None or out_features % len(given):
            raise PhiloraError(f"'{name}': cannot split {out_features} rows into {len(given)} equal slices")
        return [out_features // len(given)] * len(given), given
    return (list(table[1]), None) if table else None


def _out_features(model, name: str) -> Optional[int]:
    if model is None:
        return None
    try:
        shape = linear_shape(model.get_submodule(name))
    except AttributeError:
        return None
    return shape[1] if shape else None


def _to_block_diagonal(name: str, B: torch.Tensor, k: int, r: int, model, enable_lora) -> torch.Tensor:
    """A loralib MergedLinear's lora_B (rows of the k enabled slices, r) as PEFT's (out, r*k)."""
    target_out = _out_features(model, name)
    layout = _slice_layout(model, name, enable_lora, target_out)
    if layout is None and target_out == B.shape[0]:  # every slice enabled: k equal slices
        layout = ([B.shape[0] // k] * k, [True] * k)
    if layout is None:
        raise PhiloraError(f"'{name}' is a loralib MergedLinear (A has {k}x r rows) and its slices are "
                           f"unknown: pass --base (a fused module philora knows) or enable_lora")
    sizes, enabled = layout
    if enabled is None:  # the model's table: the one choice of k slices whose rows add up
        fits = [c for c in itertools.combinations(range(len(sizes)), k) if sum(sizes[i] for i in c) == B.shape[0]]
        if len(fits) != 1:
            names = fused_slices(model.config, name)[0]
            options = " or ".join("+".join(names[i] for i in c) for c in fits) or "none"
            raise PhiloraError(f"'{name}': which {k} slices carry LoRA is not in a loralib checkpoint "
                               f"(fits: {options}); pass enable_lora={{'{name.rsplit('.', 1)[-1]}': "
                               f"[...]}} (one bool per slice)")
        enabled = [i in fits[0] for i in range(len(sizes))]
    if sum(enabled) != k or sum(s for s, e in zip(sizes, enabled) if e) != B.shape[0]:
        raise PhiloraError(f"'{name}': lora_B has {B.shape[0]} rows and A has {k}x r rows; enabled "
                           f"slices {enabled} of sizes {sizes} do not fit")
    return block_diagonal(B, sizes, enabled, r)


def _from_block_diagonal(name: str, B: torch.Tensor, k: int, r: int, model,
                         enable_lora) -> Tuple[torch.Tensor, List[bool]]:
    """PEFT's block-diagonal lora_B (out, r*k) back to a MergedLinear's (enabled rows, r)."""
    layout = _slice_layout(model, name, enable_lora, B.shape[0])
    if layout is None:
        raise PhiloraError(f"'{name}' has rank {r * k} = {k} x r={r}: pass --base (a fused module philora "
                           f"knows) or enable_lora to split it into loralib MergedLinear slices")
    sizes, given = layout
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    enabled, parts, rest = [False] * len(sizes), [], B.clone()
    for i in range(k):
        block = B[:, i * r:(i + 1) * r]
        hits = [j for j, (s0, n) in enumerate(zip(starts, sizes)) if block[s0:s0 + n].abs().sum() > 0]
        if given is not None:
            hits = [j for j, on in enumerate(given) if on][i:i + 1]
        if len(hits) != 1 or any(enabled[hits[0]:]):  # one slice per block, in slice order
            raise PhiloraError(f"'{name}': lora_B is not block-diagonal over the slices {sizes}: a rank-{r * k} "
                               f"LoRA is not a loralib MergedLinear of rank {r}")
        j = hits[0]
        enabled[j] = True
        parts.append(block[starts[j]:starts[j] + sizes[j]])
        rest[starts[j]:starts[j] + sizes[j], i * r:(i + 1) * r] = 0
    if rest.abs().sum() > 0:
        raise PhiloraError(f"'{name}': lora_B has weights outside the slice blocks: not a loralib MergedLinear")
    return torch.cat(parts, dim=0), enabled


def load_loralib(path: Path) -> Dict[str, torch.Tensor]:
    """A loralib state dict from .safetensors or a torch.save file (weights_only: no pickled code)."""
    if path.is_dir() or not path.exists():
        raise PhiloraError(f"{path}: not a file (a loralib checkpoint is a state dict saved with "
                           f"torch.save or safetensors)")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refusals, corrupt files: all one line
        raise PhiloraError(f"{path}: cannot read a state dict ({first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PhiloraError(f"{path}: expected a flat state dict of tensors")
    return state


def convert(source, out, to: str, r: Optional[int] = None, lora_alpha: Optional[float] = None,
            base: Optional[str] = None,
            enable_lora: Optional[Dict[str, Sequence[bool]]] = None) -> Path:
    """loralib checkpoint -> PEFT adapter directory (to="peft"), or PEFT adapter -> loralib
    .safetensors / .pt file (to="loralib"). Returns the output path (written over if it
    exists: the CLI refuses an existing output without --force)."""
    if to not in ("peft", "loralib"):
        raise PhiloraError(f"--to must be peft or loralib, got {to!r}")
    model = meta_model(base) if base else None
    if to == "peft":
        return _loralib_to_peft(Path(source), Path(out), r, lora_alpha, base, model, enable_lora)
    return _peft_to_loralib(source, Path(out), r, lora_alpha, model, enable_lora)


def _loralib_to_peft(source: Path, out: Path, r: Optional[int], lora_alpha: Optional[float],
                     base: Optional[str], model, enable_lora) -> Path:
    if r is None or lora_alpha is None:
        raise PhiloraError("loralib checkpoints store neither r nor lora_alpha: pass --r and --lora-alpha")
    state = load_loralib(source)
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = LORALIB_KEY.match(key)
        if m:
            factors.setdefault(m["module"], {})[m["which"]] = value
    if not factors:
        raise PhiloraError(f"{source}: no '<module>.lora_A' / '<module>.lora_B' tensors (not a loralib checkpoint)")
    tensors, ranks, alphas = {}, {}, {}
    for name, f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            raise PhiloraError(f"{source}: '{name}' has no lora_{'B' if 'A' in f else 'A'}")
        A, B = f["A"], f["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] % r or B.shape[1] != r:
            raise PhiloraError(f"{source}: '{name}' has lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, "
                               f"which do not fit r={r}")
        k = A.shape[0] // r
        if k > 1:
            B = _to_block_diagonal(name, B, k, r, model, enable_lora)
        if model is not None:
            target_layer(model, name, A, B, source)
        tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"] = A, B
        ranks[name], alphas[name] = r * k, lora_alpha * k
    skipped = len(state) - 2 * len(factors)
    names = list(ranks)
    fan_in_fan_out = model is not None and any(is_conv1d(model.get_submodule(n)) for n in names)
    spec = PeftConfig(r=r, lora_alpha=lora_alpha, lora_dropout=0.0)
    out_dir = write_adapter(out, tensors, ranks, alphas, base, spec,
                            target_module_names(names, linear_names(model) if model is not None else None),
                            fan_in_fan_out)
    note = f"; {skipped} non-LoRA tensors left out" if skipped else ""
    print(f"converted {len(names)} loralib modules (r={r}, lora_alpha={lora_alpha}) -> PEFT adapter {out_dir}{note}")
    return out_dir


def _peft_to_loralib(source, out: Path, r: Optional[int], lora_alpha: Optional[float], model,
                     enable_lora) -> Path:
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise PhiloraError(f"--out '{out}': a loralib checkpoint is a file ending in .safetensors or .pt")
    adapter = read_adapter(source)
    cfg = adapter.config
    rs = adapter.use_rslora
    r = r or cfg["r"]
    default_scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if rs else cfg["r"])
    lora_alpha = lora_alpha if lora_alpha is not None else default_scaling * r
    scaling = lora_alpha / r  # loralib's only formula
    state, merged = {}, {}
    for name, (A, B, _) in sorted(adapter.modules.items()):
        rank = A.shape[0]
        if rank % r:
            raise PhiloraError(f"{source}: '{name}' has rank {rank}; loralib has one rank (r={r}) per model")
        if model is not None:
            target_layer(model, name, A, B, source)
        if rank > r:
            B, merged[name] = _from_block_diagonal(name, B, rank // r, r, model, enable_lora)
        ratio = adapter.scaling(name) / scaling  # loralib's scaling is alpha / r for every layer
        state[f"{name}.lora_A"] = A.contiguous()
        state[f"{name}.lora_B"] = (B if ratio == 1.0 else B * ratio).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file(state, str(out))
    else:
        torch.save(state, out)
    print(f"converted {len(adapter.modules)} modules -> loralib checkpoint {out}; build the loralib "
          f"layers with r={r}, lora_alpha={lora_alpha:g} (loralib does not store them)")
    for name, enabled in merged.items():
        print(f"  {name}: MergedLinear(enable_lora={enabled})")
    return out
