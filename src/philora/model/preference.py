"""Preference objectives on packed pairs: DPO (sigmoid, ipo), ORPO and SimPO, as TRL 1.16 computes them.

    PreferenceLoss(model, objective, ...)   forward(batch) -> (sum of pair losses, pairs); ``take_metrics()``
    sequence_logps(model, batch)            -> per sequence: summed completion log-probs and their counts
    pair_losses(objective, logps, counts, ref, nll, ...) -> per-pair losses and TRL's metrics

A batch is data/preference.collate_pairs's: chosen and rejected are separate conversations of a
packed row (positions restart, attention never crosses them) and ``sequence`` maps each token to
its sequence (2k chosen, 2k+1 rejected of pair k). The decoder runs once over the packed rows;
log-probabilities come from model/loss.py's ``lm_head_loss`` (chunked LM head, no full logits, the
frozen head's gradient taken in the forward pass) called on each run of positions of one sequence,
so a sequence's summed completion log-probability is minus the cross-entropy of its run(s).

Formulas (TRL 1.16; S = summed completion log-prob, a = S / completion tokens, ref = the step-0 model's S):
    dpo sigmoid  -logsigmoid(beta * ((S_c - ref_c) - (S_r - ref_r)))      (1.16 ignores label_smoothing here)
    dpo ipo      (((S_c - ref_c) / n_c - (S_r - ref_r) / n_r) - 1 / (2 beta))^2
    orpo         NLL - beta * logsigmoid(log_odds), log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r));
                 NLL: token mean over the chosen sequences, prompt included (TRL's ORPO does so)
    simpo        -(1 - eps) logsigmoid(x) - eps logsigmoid(-x), x = beta (a_c - a_r) - simpo_gamma,
                 + cpo_alpha * NLL over the chosen completions (cpo_alpha 0: the paper's SimPO)
Metrics as TRL names them: rewards/chosen, rewards/rejected (DPO: beta (S - ref); ORPO, SimPO:
beta a), rewards/margins, rewards/accuracies (chosen > rejected, strict), logps/chosen,
logps/rejected, and nll_loss (ORPO, SimPO).

The loop's seam is (loss sum, count): here the count is the pairs, and the loss sum is the
per-pair losses summed, plus for ORPO/SimPO the micro-batch's NLL mean times its pairs. One
micro-batch is exactly TRL's loss; accumulated micro-batches weigh each pair alike (TRL averages
micro-batch means, the same when micro-batches hold equally many pairs).

Hand-written because TRL's trainers pad every pair to the longest sequence and materialise full
logits (ORPO/SimPO) where philora packs and never builds them.
"""

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.config import Config
from ..core.errors import PhiloraError
from ..data.encoding import IGNORE_INDEX
from .adapter import AdapterError, read_adapter
from .families import final_logit_softcap
from .loss import CHUNK, decoder_hidden, lm_head_loss

OBJECTIVES = ("dpo", "orpo", "simpo")  # "sft" is CausalLMLoss
NEEDS_REFERENCE = ("dpo",)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "nll_loss")


def sequence_logps(model: nn.Module, batch: Dict[str, torch.Tensor], nll: Optional[str] = None,
                   chunk: int = CHUNK) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(S, n, NLL): per sequence (2 x pairs, in ``sequence`` order) the summed log-probability of its
    completion tokens and their count; and the chosen sequences' token-mean NLL over ``nll``:
    "all" (every token but each sequence's first: ORPO), "completion" (SimPO), None (not computed)."""
    hidden, batch = decoder_hidden(model, batch)
    n_seq = 2 * int(batch["num_pairs"])
    seq = batch["sequence"][:, 1:]  # the sequence of each predicted token
    completion = batch["labels"][:, 1:] != IGNORE_INDEX
    chosen_nll = torch.zeros_like(completion)
    if nll == "all":
        chosen_nll = (seq >= 0) & (seq % 2 == 0) & (batch["position_ids"][:, 1:] > 0)
    elif nll == "completion":
        chosen_nll = completion & (seq % 2 == 0)
    keep = completion | chosen_nll
    h, y = hidden[:, :-1][keep], batch["input_ids"][:, 1:][keep]
    s, c = seq[keep], completion[keep]
    # runs of positions of one sequence and one kind (completion or not): one lm_head_loss each
    change = torch.ones_like(s, dtype=torch.bool)
    change[1:] = (s[1:] != s[:-1]) | (c[1:] != c[:-1])
    starts = torch.nonzero(change).flatten().tolist() + [len(s)]
    head, cap = model.get_output_embeddings(), final_logit_softcap(model.config)
    ce = [lm_head_loss(h[a:b], head, y[a:b], chunk, cap) for a, b in zip(starts[:-1], starts[1:])]
    ce = torch.stack(ce) if ce else hidden.new_zeros((0,), dtype=torch.float32)
    run_seq, run_completion = s[starts[:-1]], c[starts[:-1]]
    zero = ce.new_zeros(n_seq)
    logps = zero.index_add(0, run_seq[run_completion], -ce[run_completion])
    counts = torch.zeros(n_seq, dtype=torch.long, device=s.device).index_add(0, s[c], torch.ones_like(s[c]))
    mean_nll = None
    if nll is not None:
        on = (run_seq % 2 == 0) & (run_completion | (nll == "all"))
        mean_nll = ce[on].sum() / chosen_nll.sum().clamp(min=1)
    return logps, counts, mean_nll


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stably (TRL's ORPO: the branch at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(objective: str, logps: torch.Tensor, counts: torch.Tensor, ref: Optional[torch.Tensor],
                nll: Optional[torch.Tensor], beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                simpo_gamma: float = 0.5, cpo_alpha: float = 1.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(per-pair losses (pairs,), per-pair metrics); ORPO/SimPO's NLL term is added per pair
    (so the pairs' mean is TRL's micro-batch loss). ``ref``: (pairs, 2) chosen/rejected, DPO only."""
    s_c, s_r = logps[0::2], logps[1::2]
    n_c, n_r = counts[0::2].clamp(min=1), counts[1::2].clamp(min=1)
    if objective == "dpo":
        ref = ref.to(logps.dtype)
        d_c, d_r = s_c - ref[:, 0], s_r - ref[:, 1]
        if loss_type == "ipo":
            losses = ((d_c / n_c - d_r / n_r) - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (d_c - d_r))
        chosen, rejected, shown = beta * d_c, beta * d_r, (s_c, s_r)
    else:
        a_c, a_r = s_c / n_c, s_r / n_r
        if objective == "orpo":
            log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
            losses = -beta * F.logsigmoid(log_odds) + nll
        else:
            x = beta * (a_c - a_r) - simpo_gamma
            losses = -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)
            losses = losses + cpo_alpha * nll if cpo_alpha else losses
        chosen, rejected, shown = beta * a_c, beta * a_r, (a_c, a_r)
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "rewards/accuracies": (chosen > rejected).float(), "logps/chosen": shown[0].detach(),
               "logps/rejected": shown[1].detach()}
    if objective != "dpo":
        metrics["nll_loss"] = (nll.detach() if nll is not None else torch.zeros(())).expand_as(chosen)
    return losses, metrics


class PreferenceLoss(nn.Module):
    """Wraps a ``*ForCausalLM`` model; forward(batch) -> (sum of pair losses, pairs), the loop's
    (loss sum, count) seam. The metrics' sums since the last ``take_metrics()`` are kept here
    (a module so DistributedDataParallel can wrap it, as CausalLMLoss)."""

    def __init__(self, model: nn.Module, objective: str, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, simpo_gamma: float = 0.5, cpo_alpha: float = 1.0, chunk: int = CHUNK):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
        self.model, self.objective, self.chunk = model, objective, chunk
        self.options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                            simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha)
        self.nll = {"orpo": "all", "simpo": "completion" if cpo_alpha else None}.get(objective)
        self.sums: Dict[str, torch.Tensor] = {}

    def forward(self, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        logps, counts, nll = sequence_logps(self.model, batch, self.nll, self.chunk)
        ref = batch.get("ref_logps")
        if self.objective in NEEDS_REFERENCE and ref is None:
            raise ValueError("a DPO batch needs the reference log-probs (ref_logps): compute them first")
        losses, metrics = pair_losses(self.objective, logps, counts, ref, nll, **self.options)
        pairs = batch["num_pairs"]
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, torch.zeros((), dtype=torch.float64)) + v.double().sum().cpu()
        self.sums["pairs"] = self.sums.get("pairs", torch.zeros((), dtype=torch.float64)) + float(pairs)
        return losses.sum(), pairs

    def take_metrics(self) -> Dict[str, torch.Tensor]:
        """The metric sums (and "pairs") since the last call, then cleared."""
        sums, self.sums = self.sums, {}
        return sums


@torch.no_grad()
def reference_logps(model: nn.Module, batch: Dict[str, torch.Tensor], chunk: int = CHUNK) -> torch.Tensor:
    """(pairs, 2) summed completion log-probs, chosen and rejected: the reference of DPO, taken from
    the model as it is (the caller puts it in eval mode at step 0)."""
    logps, _, _ = sequence_logps(model, batch, None, chunk)
    return logps.view(-1, 2).double().cpu()


def check_start(cfg: Config) -> Optional[Path]:
    """Before the model loads: the adapter training starts from (``peft_config.init_adapter``,
    read and checked), None for a fresh one; a one-line PhiloraError when it cannot be read, as
    DPO's reference (the step-0 model) could not be formed from it."""
    if cfg.training_config.objective in NEEDS_REFERENCE and cfg.training_config.fsdp:
        raise PhiloraError("training_config.fsdp: DPO's reference pass runs on the whole model, which FSDP "
                           "shards; not supported yet with objective dpo (DDP works: fsdp false)")
    path = cfg.peft_config.init_adapter
    if path is None:
        return None
    why = "DPO's reference is the step-0 model" if cfg.training_config.objective in NEEDS_REFERENCE else \
        "training starts from it"
    p = Path(path)
    if not p.is_dir():
        raise PhiloraError(f"peft_config.init_adapter: {path}: no such directory ({why})")
    if not (p / "adapter_config.json").is_file() and any(p.glob("checkpoint-*")):
        raise PhiloraError(f"peft_config.init_adapter: {path} is a run that has not saved its adapter yet (it "
                           f"did not finish): finish it with --resume first ({why})")
    try:
        adapter = read_adapter(p, dora=True)
    except AdapterError as e:
        raise PhiloraError(f"peft_config.init_adapter: {e} ({why})") from None
    for key in ("use_dora", "use_rslora"):  # how its tensors scale: the run saves them with peft_config's
        if bool(adapter.config.get(key, False)) != getattr(cfg.peft_config, key):
            raise PhiloraError(f"peft_config.init_adapter: {path} was trained with {key}: "
                               f"{str(bool(adapter.config.get(key))).lower()}; set peft_config.{key} to match")
    return p
