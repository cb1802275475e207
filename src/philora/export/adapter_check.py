"""``philora adapter check``: what a serving engine (vLLM) will refuse or serve wrongly.

Before deploying: features it rejects (DoRA: merge it instead; modules_to_save, bias, ...),
ranks beyond the largest ``--max-lora-rank`` it accepts (1, 8, 16, 32, 64, 128, 256, 320, 512;
vllm/config/lora.py ``MaxLoRARanks``, default 16), and against the base model (built on the meta
device: names and shapes, no weights) target modules it does not have, since an adapter whose
modules match nothing serves the base model. For a philora run of a LongRoPE model, the side of
the factor switch it trained on and the ``--max-model-len`` that serves it so (serving.py).
Hand-written: no library checks this offline.
"""

from pathlib import Path
from typing import List, Optional, Tuple

from ..core.errors import PhiloraError
from ..model.adapter import AdapterError, read_adapter, scan_adapter
from ..model.families import longrope_switch
from ..model.inject import target_layer
from ..model.loading import meta_model
from ..run.serving import read_record

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def adapter_rank(adapter) -> int:
    """The largest rank among an adapter's (model.adapter.read_adapter's) LoRA modules; 0 with none."""
    return max((A.shape[0] for A, _, _ in adapter.modules.values()), default=0)


def vllm_max_lora_rank(rank: int) -> int:
    """The ``--max-lora-rank`` vLLM serves a rank-``rank`` adapter with: the smallest it accepts that holds
    it; beyond its largest, PhiloraError (one line)."""
    fits = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fits:
        raise PhiloraError(f"rank {rank} is beyond vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    return fits[0]


def _target_matches(target_modules, names: List[str]) -> List[str]:
    """Entries of a PEFT target_modules list that match none of the model's module names."""
    if not isinstance(target_modules, list):
        return []
    return [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def check(adapter_dir, base: Optional[str] = None) -> Tuple[List[str], List[str]]:
    """(errors, warnings) for serving ``adapter_dir`` with vLLM on ``base``. Unreadable: AdapterError."""
    adapter, errors = scan_adapter(adapter_dir)
    cfg, warnings = adapter.config, []
    if cfg.get("bias", "none") != "none":
        errors.append(f"bias={cfg['bias']!r}: vLLM does not support adapter biases")
    if cfg.get("use_dora"):
        errors.append(f"DoRA (use_dora): vLLM cannot serve DoRA adapters; to deploy, merge it "
                      f"(philora merge {adapter_dir} --out DIR) and serve the merged model")
    modules = adapter.modules
    ranks = [adapter_rank(adapter)]
    ranks += [v for v in [cfg.get("r"), *(cfg.get("rank_pattern") or {}).values()] if isinstance(v, int)]
    top = max(ranks, default=0)
    try:
        need = vllm_max_lora_rank(top)
    except PhiloraError as e:
        errors.append(str(e))
        need = None
    if need is not None and top > VLLM_DEFAULT_MAX_LORA_RANK:
        warnings.append(f"rank {top}: serve with vLLM --max-lora-rank {need} (its default is "
                        f"{VLLM_DEFAULT_MAX_LORA_RANK}; allowed: {', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    if modules and not errors and len({round(adapter.scaling(n), 9) for n in modules}) > 1:
        warnings.append("rank_pattern/alpha_pattern give modules different scalings; vLLM versions that "
                        "read only r and lora_alpha scale them wrongly")
    name = base or cfg.get("base_model_name_or_path")
    if not name:
        warnings.append("no base model (base_model_name_or_path is empty): module names and shapes "
                        "not checked; pass --base")
        return errors, warnings
    try:
        model = meta_model(name, local_only=base is None)
    except PhiloraError as e:
        warnings.append(f"{e}: module names and shapes not checked; pass --base")
        return errors, warnings
    for module, (A, B, _) in sorted(modules.items()):
        try:
            target_layer(model, module, A, B, Path(adapter_dir).name)
        except AdapterError as e:
            errors.append(str(e))
    names = [n for n, _ in model.named_modules()]
    for t in _target_matches(cfg.get("target_modules"), names):
        warnings.append(f"target_modules entry '{t}' matches no module of {name}")
    if modules and all(m not in names for m in modules):
        errors.append(f"none of the adapter's modules is in {name}: it would serve the base model unchanged")
    switch = longrope_switch(getattr(model, "config", None))
    if switch is not None and read_record(adapter_dir) is None:  # not a philora run: the side is unknown
        warnings.append(f"{name} uses LongRoPE (short rotary factors up to {switch} tokens, long above): "
                        f"serve on the side the adapter was trained on, vLLM --max-model-len <= {switch} "
                        f"for the short factors, above for the long")
    return errors, warnings


def check_cli(adapter, base: Optional[str] = None) -> int:
    """``philora adapter check``: one line per problem; exit 1 on an error, 0 when clean."""
    errors, warnings = check(adapter, base)
    notes = []
    record = read_record(adapter)  # a philora run of a LongRoPE model: the side it trained on
    if record is not None:
        both = record["short"]["conversations"] and record["long"]["conversations"]
        (warnings if both else notes).append(record["advice"])
    for e in errors:
        print(f"error: {e}")
    for w in warnings:
        print(f"warning: {w}")
    for n in notes:
        print(f"note: {n}")
    if errors:
        print(f"{adapter}: {len(errors)} error(s), {len(warnings)} warning(s)")
        return 1
    a = read_adapter(adapter)
    ranks = sorted({A.shape[0] for A, _, _ in a.modules.values()})
    print(f"{adapter}: ok ({len(a.modules)} LoRA modules, rank {'/'.join(map(str, ranks))}"
          f"{f', {len(warnings)} warning(s)' if warnings else ''})")
    return 0
