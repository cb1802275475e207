"""The training loop: LoRA SFT of a causal LM on chat data, one readable function.

Hand-written (not transformers' Trainer / TRL) because the loop is the product's fast path:
padding-free packing, a loss that never materialises full logits, accumulation normalised by
label tokens, exact resume. Everything around it (models, tokenizers, DDP, TensorBoard) comes
from the usual libraries; the three LR schedules are transformers' formulas written out here,
because importing ``transformers.get_scheduler`` pulls in PEFT and bitsandbytes (seconds of
start-up and a warning on every run).
"""

import contextlib
import math
import random
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import yaml

from ..core.config import RESUME_APPLIED, Config, check_values, config_to_dict
from ..core.diskio import staged, write_text
from ..core.errors import PhiloraError
from ..data.batching import collate
from ..data.build import build_datasets
from ..data.examples import epoch_indices, epoch_size
from ..model import memory
from ..model.adapter import save_adapter
from ..model.devices import pick_device
from ..model.inject import count_parameters, inject_lora
from ..model.loading import load_model_and_tokenizer, load_tokenizer, resolve_path
from ..model.loss import CausalLMLoss
from ..model.neftune import NEFTune
from . import distributed
from .checkpoint import (changed_settings, clean_stale, find_resumable, load_checkpoint, nonfinite,
                         save_checkpoint, trainable_state)
from .distributed import World
from .evalgen import eval_generations
from .metrics import RunLogger, plot_losses
from .optim import advice, make_optimizer
from .preempt import SignalGuard
from .runlock import acquire as lock_output_dir
from .serving import rope_regimes, write_notes
from .trackers import Trackers, check_trackers

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.yaml",
             "loss.png", "report.md", "report.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "longrope.json")


def total_steps(cfg: Config, n_train: int, world: int) -> int:
    tc = cfg.training_config
    if tc.max_steps > 0:
        return tc.max_steps
    per_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world
    return max(1, math.ceil(tc.num_train_epochs * n_train / per_step))


def lr_scheduler(name: str, optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' ``get_scheduler(name, ...)`` for cosine, linear and constant (which, as
    there, ignores warmup): the same multipliers, step for step (tested against it)."""
    def warm(step: int) -> Optional[float]:
        return step / max(1, warmup) if step < warmup else None

    def linear(step: int) -> float:
        w = warm(step)
        return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))

    def cosine(step: int) -> float:
        w = warm(step)
        if w is not None:
            return w
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def constant(step: int) -> float:
        return 1.0

    schedules = {"linear": linear, "cosine": cosine, "constant": constant}
    if name not in schedules:
        raise PhiloraError(f"training_config.lr_scheduler_type: '{name}' is not one of {sorted(schedules)}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedules[name])


@dataclass
class TrainResult:
    """What a finished run hands on (to the end-of-run report, or a caller): the final eval
    metrics, the trained model (LoRA unmerged) and tokenizer, and the eval examples with their
    messages. ``main`` is False on every torchrun rank but 0."""
    metrics: Dict[str, float]
    output_dir: Path
    model: torch.nn.Module
    tokenizer: object
    eval_examples: List[dict]
    main: bool = True


def micro_batches(examples: List[dict], start: int, batch: int, world: World, seed: int,
                  shuffle: bool) -> Iterator[List[dict]]:
    """This rank's micro-batches from global sample ``start`` on, across epochs.

    The global order is a function of (seed, epoch); each global micro-batch of
    ``batch * world`` samples is split by rank. Resume only needs ``start``.
    """
    n, pos = epoch_size(examples), start  # a weighted mixture's epoch (examples.py)
    orders: Dict[int, List[int]] = {}
    while True:
        idx = []
        for p in range(pos, pos + batch * world.size):
            epoch = p // n
            if epoch not in orders:
                orders = {epoch: epoch_indices(examples, seed, epoch, shuffle)}
            idx.append(orders[epoch][p % n])
        pos += batch * world.size
        yield [examples[i] for i in idx[world.rank * batch:(world.rank + 1) * batch]]


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def row_capacity(model: torch.nn.Module, max_length: int) -> int:
    """Tokens per packed row. philora_sdpa / philora_softcap / FlashAttention attend within each
    conversation whatever the row holds, so a micro-batch packs into one row with no padding
    (bench: 19% of positions were padding at max_length 512); eager or a masked sdpa pays
    row_length^2 per row, so rows stay at max_length."""
    impl = str(getattr(model.config, "_attn_implementation", "") or "")
    return 2 ** 62 if impl.startswith("philora_") or "flash" in impl else max_length


@torch.no_grad()
def evaluate(loss_fn, examples: List[dict], cfg: Config, pad_id: int, device: torch.device,
             world: World = World(), autocast=contextlib.nullcontext) -> Dict[str, float]:
    """Loss per label token and perplexity over ``examples`` (sharded over ranks), batched and
    packed as ``cfg`` says: the one eval loss of training, ``philora eval`` and the report."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = torch.zeros(()), torch.zeros(())
    batch, dc = cfg.training_config.per_device_eval_batch_size, cfg.data
    for part, counted in distributed.eval_batches(world, examples, batch):
        b = to_device(collate(part, pad_id, dc.packing, dc.max_length), device)
        with autocast():
            loss_sum, n = loss_fn(b)
        if counted:
            total += loss_sum.float().cpu()
            count += n.cpu()
    total, count = distributed.all_sum(world, total, count)
    loss_fn.train(was_training)
    loss = (total / count.clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, cfg: Config) -> tuple:
    """Check ``out`` is free (or resumable, with the same training settings): returns the
    verified checkpoint to resume from (or None); with ``overwrite``, the previous run's files,
    which :func:`remove_run` deletes only once the new run's inputs have loaded; and the
    settings a resume changes (config.RESUME_APPLIED: the run's length) as (key, old, new)."""
    if resume:
        ckpt = find_resumable(out)
        changes = changed_settings(ckpt, cfg)
        refused = [f"{k} {old!r} -> {new!r}" for k, old, new in changes if k not in RESUME_APPLIED]
        if refused:
            raise PhiloraError(f"--resume: {ckpt} was trained with other settings: {'; '.join(refused)}; "
                               f"resume with the run's values (see {ckpt / 'config.yaml'}) or start a "
                               f"new run (another output_dir, or --overwrite)")
        if changes:  # the run's length: applied, said here and at the top of config.yaml
            print(f"--resume: applied {'; '.join(f'{k} {old!r} -> {new!r}' for k, old, new in changes)} "
                  f"(the learning-rate schedule follows the new length from {ckpt.name} on)")
        return ckpt, [], changes
    existing = [p for p in out.glob("*") if p.name in RUN_FILES or p.name.startswith("checkpoint-")
                or p.name == "tensorboard"] if out.is_dir() else []
    if existing and not overwrite:
        raise PhiloraError(f"output_dir '{out}' already holds a run; pass --resume to continue it, "
                           f"--overwrite to replace it, or set training_config.output_dir")
    return None, existing, []


def remove_run(paths: List[Path]) -> None:
    """Delete the previous run's files (--overwrite): only philora's own, never a directory the
    user filled."""
    for p in paths:
        try:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PhiloraError(f"--overwrite: cannot delete '{p}': {e.strerror or e}") from None


def save_final_adapter(model, tokenizer, out: Path, base_path: str, pc) -> None:
    """The PEFT adapter and the tokenizer, staged and renamed into ``out`` (a full disk leaves
    no half-written adapter); never an adapter with NaN or infinite values."""
    bad = nonfinite(trainable_state(model))
    if bad:
        raise PhiloraError(f"'{bad}' holds NaN or infinite values: the adapter was not saved (the "
                           f"checkpoints in {out} are finite)")
    with staged(out) as tmp:
        save_adapter(model, tmp, base_path, pc)
        tokenizer.save_pretrained(str(tmp))


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune per ``cfg``; writes everything to output_dir and returns what the end-of-run
    report needs (``report.end_of_run`` makes it; the CLI does so after every run). The
    output_dir's lock and the SIGTERM/SIGINT handlers are held for the call and released however
    it ends; a signal stops the run after the current step with a checkpoint (preempt.Interrupted)."""
    with contextlib.ExitStack() as held:
        return _train(cfg, resume, overwrite, held)


def _train(cfg: Config, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> TrainResult:
    tc, pc, dc = cfg.training_config, cfg.peft_config, cfg.data
    check_values(cfg)  # before --overwrite deletes anything
    report_to = check_trackers(tc.report_to)  # a tracker's missing package: one line, before anything loads
    world = distributed.setup()
    if tc.eval_generations and tc.fsdp and world.enabled:  # a sharded model generates only with every rank in step
        raise PhiloraError("training_config.eval_generations does not work with training_config.fsdp; set "
                           "eval_generations: 0 (the end-of-run report still generates) or fsdp: false")
    guard = held.enter_context(SignalGuard(announce=world.main))
    out = Path(tc.output_dir)

    def claim():  # rank 0: one trainer per output_dir; clean what killed saves left; check it
        held.enter_context(lock_output_dir(out))
        leftovers = clean_stale(out)
        if leftovers:
            print(f"removed what an interrupted save left in {out}: {', '.join(sorted(leftovers))}")
        return prepare_output_dir(out, resume, overwrite, cfg)
    ckpt, old_run, applied = distributed.on_main(world, claim)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else pick_device()

    # Tokenizer and data, then model and LoRA: a bad record is reported before a large model loads.
    log = print if world.main else (lambda *a, **k: None)
    tokenizer = load_tokenizer(resolve_path(cfg.model.name_or_path), cfg.model.trust_remote_code,
                               cfg.model.revision)
    # One process per node tokenizes (or finds the cache); the node's others then map its files.
    train_set, eval_set, _ = distributed.local_first(world, lambda: build_datasets(dc, tokenizer, tc.seed, log=log))
    distributed.check_run(world, cfg, epoch_size(train_set))
    model, tokenizer, base_path = load_model_and_tokenizer(cfg.model, device, training=True)
    inject_lora(model, pc)
    trainable, total = count_parameters(model)
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    for warning in advice(cfg, world.size):  # learning rate, batch size: once, before training
        log(f"philora: warning: {warning}")
    if tc.neftune_noise_alpha:  # noise on the input embeddings in training mode; off when train() ends
        held.callback(NEFTune(model, tc.neftune_noise_alpha).remove)
    regimes = rope_regimes(model.config, train_set)  # LongRoPE: which factor set(s) this run trains
    if regimes:
        log(regimes["advice"])
    loss_fn = CausalLMLoss(model)
    loss_fn.train()
    row = row_capacity(model, dc.max_length)  # packed rows: one per micro-batch where attention allows
    amp = device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=model.dtype)) if amp else contextlib.nullcontext
    if cfg.model.gradient_checkpointing == "auto":  # on where the longest micro-batch would not fit
        on, line = memory.plan(loss_fn, train_set, tc.per_device_train_batch_size,
                               tokenizer.pad_token_id, device, autocast)
        if distributed.all_sum(world, torch.tensor(float(on)))[0] > 0:  # every rank alike
            memory.enable_checkpointing(model)
        log(line)
    if world.enabled:
        loss_fn = distributed.wrap(loss_fn, device, tc.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg)  # AdamW; LoRA+'s groups with peft_config.loraplus_lr_ratio
    steps = total_steps(cfg, epoch_size(train_set), world.size)
    warmup = tc.warmup_steps if tc.warmup_steps > 0 else math.ceil(tc.warmup_ratio * steps)
    scheduler = lr_scheduler(tc.lr_scheduler_type, optimizer, warmup, steps)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if applied:  # what was used before this resume, where the run's config is read
        config_yaml = f"# resumed from {ckpt.name}, trained until then with " + ", ".join(
            f"{k}: {old!r}" for k, old, _ in applied) + "\n" + config_yaml

    # Resume: LoRA tensors, optimizer, scheduler, RNG and data position.
    state = {"step": 0, "samples_seen": 0, "elapsed": 0.0, "world_size": world.size}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        distributed.check_resume(world, state, tc.per_device_train_batch_size, tc.gradient_accumulation_steps)
        state["world_size"] = world.size
        log(f"resumed from {ckpt} at step {state['step']}")
    if world.main:
        remove_run(old_run)  # --overwrite: only now that data, tokenizer and model have loaded
        write_text(out / "config.yaml", config_yaml)
    guard.immediate("stopped before the first step, nothing trained: start again with --overwrite" if ckpt is None
                    else f"stopped before training resumed; {ckpt.name} is as it was: --resume again")
    opened = []  # rank 0: MLflow / W&B / trackio runs, finished (or marked failed) when train() ends
    distributed.on_main(world, lambda: opened.append(held.enter_context(
        Trackers(out, report_to, config_to_dict(cfg), resume=ckpt is not None))))
    trackers = opened[0] if opened else None
    logger = RunLogger(out, steps, state["step"], enabled=world.main, progress_bar=tc.progress_bar,
                       elapsed=state["elapsed"], tensorboard="tensorboard" in report_to, trackers=trackers)
    held.callback(logger.close, quiet=True)  # a run that fails lets go of its files (no-op after close())
    pad_id = tokenizer.pad_token_id
    eval_subset = eval_set[:tc.eval_max_samples] if tc.eval_max_samples > 0 else eval_set

    def run_eval(step: int) -> Dict[str, float]:
        if not eval_subset:  # no eval set (data.eval_fraction=0): nothing to evaluate
            return {}
        m = evaluate(loss_fn, eval_subset, cfg, pad_id, device, world, autocast)
        logger.write({"step": step, **m})
        logger.print(f"step {step}: eval_loss {m['eval_loss']:.4f}  perplexity {m['eval_perplexity']:.2f}")
        if tc.eval_generations:  # rank 0 generates, on the plain model; its error stops every rank
            distributed.on_main(world, lambda: logger.write({"step": step, "generations": eval_generations(
                model, tokenizer, eval_subset[:tc.eval_generations])}))
        return m

    metrics = run_eval(0) if state["step"] == 0 else {}
    if state.pop("eval_pending", False):  # a signal stopped the run before this eval
        metrics = run_eval(state["step"])
    batches = micro_batches(train_set, state["samples_seen"], tc.per_device_train_batch_size, world,
                            tc.seed, dc.shuffle)
    window = {"loss": torch.zeros(()), "labels": torch.zeros(()), "tokens": 0, "t": logger.elapsed(),
              "skipped": 0}
    carried = state.pop("window", None)
    if carried and world.main:  # steps since the last log record: logged with the next one, as if never stopped
        window.update(loss=torch.tensor(carried["loss"]), labels=torch.tensor(carried["labels"]),
                      tokens=carried["tokens"], t=carried["t"], skipped=carried.get("skipped", 0))

    def save(step: int, **extra) -> Path:
        """checkpoint-STEP, written by rank 0 (an error there stops every rank), with this log
        window's global sums so a resume logs the same records."""
        loss, labels, tokens = distributed.all_sum(world, window["loss"], window["labels"],
                                                   torch.tensor(float(window["tokens"])))
        state["elapsed"] = logger.elapsed()
        saved = dict(state, window={"loss": loss.item(), "labels": labels.item(), "tokens": int(tokens.item()),
                                    "t": window["t"], "skipped": window["skipped"]}, **extra)
        return distributed.on_main(world, lambda: save_checkpoint(out, step, model, optimizer, scheduler, saved,
                                                                  config_yaml, tc.save_total_limit))

    grad_norm = torch.zeros(())
    bad_steps = 0
    guard.defer()  # from here a signal stops the run after the current step, with a checkpoint
    while state["step"] < steps:
        # Dropout draws from (seed, rank, step): ranks differ, and a resume replays them exactly.
        torch.manual_seed(distributed.step_seed(tc.seed, world.rank, state["step"]))
        # One optimizer step: accumulate micro-batches, normalised by the label tokens of all of
        # them on all ranks, so every label token weighs the same (no mean of means).
        micro = [collate(next(batches), pad_id, dc.packing, row)
                 for _ in range(tc.gradient_accumulation_steps)]
        (n_labels,) = distributed.all_sum(world, sum(b["num_label_tokens"] for b in micro))
        scale = world.size / n_labels.clamp(min=1).item()  # DDP averages over ranks: undo that
        step_loss, step_labels, step_tokens = torch.zeros(()), torch.zeros(()), 0
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or not world.enabled) else loss_fn.no_sync()
            with sync, autocast():
                loss_sum, n = loss_fn(to_device(b, device))
                (loss_sum.float() * scale).backward()
            step_loss += loss_sum.detach().float().cpu()
            step_labels += n.cpu()
            step_tokens += int(b["num_tokens"])
        # The norm is logged either way; max_grad_norm 0 means no clipping.
        norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0
                                              else float("inf"))
        # One all-reduce for what every rank must decide alike: skip a step whose loss or gradient
        # is NaN/inf (no update: the weights and Adam's moments stay finite), and stop after this
        # step on SIGTERM/SIGINT.
        finite = math.isfinite(step_loss.item()) and math.isfinite(float(norm))
        bad, stop = distributed.all_sum(world, torch.tensor(float(not finite)), torch.tensor(float(guard.requested)))
        bad_steps = bad_steps + 1 if bad else 0
        if bad:
            window["skipped"] += 1
        else:
            optimizer.step()
            grad_norm = norm
            window["loss"] += step_loss
            window["labels"] += step_labels
        window["tokens"] += step_tokens
        with warnings.catch_warnings(action="ignore") if bad else contextlib.nullcontext():
            scheduler.step()  # (torch warns of misuse when a run's first update is skipped)
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["samples_seen"] += tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world.size
        step = state["step"]
        if bad_steps >= tc.max_bad_steps:
            raise PhiloraError(
                f"training stopped at step {step}: {bad_steps} step(s) in a row had a NaN or infinite loss or "
                f"gradient norm (training_config.max_bad_steps={tc.max_bad_steps}); the weights were last "
                f"updated at step {step - bad_steps} and no adapter was saved; lower "
                f"training_config.learning_rate, keep max_grad_norm > 0, or train in float32 (model.dtype)")
        if bad:
            logger.print(f"philora: warning: step {step}: NaN or infinite loss or gradient norm; the update "
                         f"was skipped ({bad_steps} in a row; {tc.max_bad_steps} in a row stop the run)")

        if step % tc.logging_steps == 0 or step == steps:
            loss, labels, tokens = distributed.all_sum(world, window["loss"], window["labels"],
                                                       torch.tensor(float(window["tokens"])))
            now = logger.elapsed()
            rec = {"step": step, "loss": round((loss / labels.clamp(min=1)).item(), 6),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                   "tokens": int(tokens.item()), "tokens_per_s": round(tokens.item() / max(now - window["t"], 1e-9), 1),
                   "epoch": round(state["samples_seen"] / epoch_size(train_set), 4)}
            if window["skipped"]:  # non-finite steps are left out of the loss, and counted
                rec["skipped_steps"] = window["skipped"]
                if labels.item() == 0:
                    rec["loss"] = None
            logger.write(rec)
            logger.progress(0, loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "-",
                            lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window = {"loss": torch.zeros(()), "labels": torch.zeros(()), "tokens": 0, "t": now, "skipped": 0}
        logger.progress(1)
        if stop and step < steps:  # SIGTERM/SIGINT: checkpoint now; a due eval is the resumed run's first
            saved = save(step, eval_pending=tc.eval_steps > 0 and step % tc.eval_steps == 0)
            raise guard.interrupted(f"stopped after step {step} with a checkpoint in {saved}; continue "
                                    f"with the same command and --resume")
        if tc.eval_steps > 0 and step % tc.eval_steps == 0 and step != steps:
            metrics = run_eval(step)
        if tc.save_steps > 0 and step % tc.save_steps == 0:
            save(step)

    # The adapter first (small, quick: saved even if a scheduler's kill follows), then the final eval.
    distributed.on_main(world, lambda: save_final_adapter(model, tokenizer, out, base_path, pc))
    distributed.on_main(world, lambda: write_notes(out, base_path, regimes))  # README, longrope.json
    logger.print(f"adapter saved to {out} (PEFT format)")
    (stop,) = distributed.all_sum(world, torch.tensor(float(guard.requested)))
    skipped = (f"the adapter is saved in {out}; the final evaluation and report were skipped "
               f"(`philora eval {out} --out DIR` makes them)")
    if stop:
        raise guard.interrupted(skipped)
    guard.immediate(skipped)
    metrics = run_eval(state["step"])
    if world.main:
        try:
            plot_losses(out)
        except PhiloraError as e:  # the run is saved: a plot that cannot be written is a warning
            logger.print(f"philora: warning: {e}")
    logger.close()
    distributed.teardown(world)
    return TrainResult(metrics, out, model, tokenizer, eval_subset, world.main)
