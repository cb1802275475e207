"""What ``training_config.objective`` changes in a run, and nothing else: the data (conversations
for sft, preference pairs for dpo / orpo / simpo), the loss object behind the loop's (loss sum,
count) seam, how micro-batches are collated, the metrics the loss object adds to the log, and
DPO's reference log-probs (model/preference_ref.py: computed once at step 0 and kept in the run
directory, read back on a resume). The loop itself is the same for every objective."""

import math
from typing import Callable, Dict, List, Tuple

import torch

from ..core.config import Config
from ..core.errors import PhiloraError
from ..data.batching import collate
from ..data.build import build_datasets
from ..data.examples import epoch_indices
from ..data.preference import PairSequences, build_pairs, collate_pairs
from ..model.loss import CausalLMLoss
from ..model.preference import NEEDS_REFERENCE, PreferenceLoss, check_start
from ..model.preference_ref import load_reference, reference_table, save_reference, with_reference
from . import distributed
from .schedule import total_steps
from .start import Opened


def load_data(cfg: Config, tokenizer, log: Callable) -> Tuple[list, list]:
    """Train and eval sets of the objective; for preference objectives ``peft_config.init_adapter``
    is checked here too (before any model loads)."""
    tc = cfg.training_config
    check_start(cfg)
    if tc.objective == "sft":
        train, evals, _ = build_datasets(cfg.data, tokenizer, tc.seed, log=log)
        return train, evals
    train, evals, _ = build_pairs(cfg.data, tokenizer, tc.seed, log=log)
    return train, evals


def loss_object(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The loss object (forward(batch) -> (loss sum, count)) of the objective."""
    tc = cfg.training_config
    if tc.objective == "sft":
        return CausalLMLoss(model)
    return PreferenceLoss(model, tc.objective, beta=tc.beta, loss_type=tc.loss_type,
                          label_smoothing=tc.label_smoothing, simpo_gamma=tc.simpo_gamma, cpo_alpha=tc.cpo_alpha)


def collate_for(cfg: Config) -> Callable:
    """collate(examples, pad_id, packing, max_length) of the objective's examples."""
    return collate if cfg.training_config.objective == "sft" else collate_pairs


def sequences(cfg: Config, examples) -> list:
    """The examples as conversations ({"input_ids", "labels"}), what memory planning and the
    LongRoPE record measure: a pair is its two sequences."""
    return examples if cfg.training_config.objective == "sft" else PairSequences(examples)


def take_metrics(loss_fn: torch.nn.Module) -> Dict[str, float]:
    """The loss object's metric sums since the last call (preference: rewards/*, "pairs"), {} for sft."""
    inner = getattr(loss_fn, "module", loss_fn)  # under DDP / FSDP: the wrapped loss object
    take = getattr(inner, "take_metrics", None)
    return {k: float(v) for k, v in take().items()} if take else {}


def averages(world, sums: Dict[str, float], prefix: str = "") -> Dict[str, float]:
    """Metric sums of every rank, per pair; {} when there are none (every rank alike)."""
    if not sums:
        return {}
    keys = sorted(sums)
    totals = distributed.all_sum(world, *[torch.tensor(float(sums[k]), dtype=torch.float64) for k in keys])
    got = {k: t.item() for k, t in zip(keys, totals)}
    pairs = max(got.pop("pairs"), 1.0)
    return {f"{prefix}{k}": round(v / pairs, 6) for k, v in got.items()}


def read_pairs(cfg: Config, train: List[dict], world_size: int) -> List[int]:
    """The train pairs a run of ``cfg`` reads (its steps x global batch, in the epochs' orders)."""
    tc, n = cfg.training_config, len(train)
    samples = total_steps(cfg, n, world_size) * tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world_size
    used = set()
    for epoch in range(math.ceil(samples / n) if n else 0):
        order = epoch_indices(train, tc.seed, epoch, cfg.data.shuffle)  # as run/batches.py reads them
        used.update(int(i) for i in order[:samples - epoch * n])
    return sorted(used)


def reference(run: Opened, cfg: Config, model: torch.nn.Module, train: List[dict], evals: List[dict],
              pad_id: int, autocast: Callable) -> Tuple[list, list, dict]:
    """DPO: the pairs with their reference log-probs and the tables to keep (``save_reference``
    once the run directory is the run's); other objectives: as they are. A new run computes them
    now, with the model as it starts (each rank a share, summed), for the eval pairs and the train
    pairs it will read (a max_steps run of a large set reads a part; the others are NaN); a resume
    reads the run's own, and refuses to read further than they reach (a longer run: the step-0
    model is gone)."""
    if cfg.training_config.objective not in NEEDS_REFERENCE:
        return train, evals, {}
    world, tc, dc = run.world, cfg.training_config, cfg.data
    sets = {"train": train, "eval": evals}
    needed = {"train": read_pairs(cfg, train, world.size), "eval": list(range(len(evals)))}
    tables = load_reference(run.out, sets) if run.ckpt is not None else None
    if run.ckpt is not None and (tables is None or torch.isnan(tables["train"][needed["train"]]).any()):
        why = "has no reference_logps.safetensors" if tables is None else "has DPO reference log-probs for fewer train pairs"
        raise PhiloraError(f"--resume: {run.out} {why} than this run reads (they are computed by the step-0 model "
                           f"before the first step): keep the run's length, or start again with --overwrite")
    if tables is None:
        run.log(f"dpo: reference log-probs of {len(needed['train'])} train and {len(evals)} eval pairs (the "
                f"step-0 model)")
        tables = {}
        for name, pairs in sets.items():
            table = reference_table(model, pairs, pad_id, dc.packing, dc.max_length, tc.per_device_eval_batch_size,
                                    run.device, autocast, indices=needed[name][world.rank::world.size])
            if world.enabled and len(pairs):  # each rank filled its share: one sum of every value
                table = torch.stack(distributed.all_sum(world, *table.flatten())).view(-1, 2)
            unread = torch.ones(len(pairs), dtype=torch.bool)
            unread[needed[name]] = False
            tables[name] = table.masked_fill(unread[:, None], float("nan"))
    return with_reference(train, tables["train"]), with_reference(evals, tables["eval"]), tables


def keep_reference(run: Opened, tables: dict, train: List[dict], evals: List[dict]) -> None:
    """Write DPO's reference tables to the run directory (rank 0; a resume finds them there)."""
    if tables and run.world.main:
        save_reference(run.out, tables, {"train": train, "eval": evals})
