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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch
import yaml

from . import distributed
from .adapter import save_adapter
from .batching import collate, epoch_order
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, check_values, config_to_dict
from .data import build_datasets
from .distributed import World
from .errors import PhiloraError
from .inject import count_parameters, inject_lora
from .devices import pick_device
from .loading import load_model_and_tokenizer, load_tokenizer, resolve_path
from .loss import CausalLMLoss
from .metrics import RunLogger, plot_losses

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.yaml",
             "loss.png", "report.md", "report.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


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
    n, pos = len(examples), start
    orders: Dict[int, List[int]] = {}
    while True:
        idx = []
        for p in range(pos, pos + batch * world.size):
            epoch = p // n
            if epoch not in orders:
                orders = {epoch: epoch_order(n, seed, epoch, shuffle)}
            idx.append(orders[epoch][p % n])
        pos += batch * world.size
        yield [examples[i] for i in idx[world.rank * batch:(world.rank + 1) * batch]]


def to_device(batch: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Check ``out`` is free (or resumable); returns the checkpoint to resume from."""
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise PhiloraError(f"--resume: no complete checkpoint in '{out}' to resume from")
        return ckpt
    existing = [p for p in out.glob("*") if p.name in RUN_FILES or p.name.startswith("checkpoint-")
                or p.name == "tensorboard"] if out.is_dir() else []
    if existing and not overwrite:
        raise PhiloraError(f"output_dir '{out}' already holds a run; pass --resume to continue it, "
                           f"--overwrite to replace it, or set training_config.output_dir")
    for p in existing:  # only philora's own files: never a directory the user filled
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return None


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune per ``cfg``; writes everything to output_dir and returns what the end-of-run
    report needs (``report.end_of_run`` makes it; the CLI does so after every run)."""
    tc, pc, dc = cfg.training_config, cfg.peft_config, cfg.data
    check_values(cfg)  # before --overwrite deletes anything
    world = distributed.setup()
    out = Path(tc.output_dir)
    ckpt = distributed.on_main(world, lambda: prepare_output_dir(out, resume, overwrite))
    if resume and ckpt is None:
        raise PhiloraError(f"--resume: no complete checkpoint in '{out}'")
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    device = torch.device("cuda", world.local_rank) if torch.cuda.is_available() else pick_device()

    # Tokenizer and data, then model and LoRA: a bad record is reported before a large model loads.
    log = print if world.main else (lambda *a, **k: None)
    tokenizer = load_tokenizer(resolve_path(cfg.model.name_or_path), cfg.model.trust_remote_code,
                               cfg.model.revision)
    train_set, eval_set, _ = build_datasets(dc, tokenizer, tc.seed, log=log)
    distributed.check_run(world, cfg, len(train_set))
    model, tokenizer, base_path = load_model_and_tokenizer(cfg.model, device, training=True)
    inject_lora(model, pc)
    trainable, total = count_parameters(model)
    log(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    loss_fn = CausalLMLoss(model)
    loss_fn.train()
    if world.enabled:
        loss_fn = distributed.wrap(loss_fn, device, tc.fsdp)
    amp = device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=model.dtype)) if amp else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
                                  eps=tc.adam_epsilon, weight_decay=tc.weight_decay)
    steps = total_steps(cfg, len(train_set), world.size)
    warmup = tc.warmup_steps if tc.warmup_steps > 0 else math.ceil(tc.warmup_ratio * steps)
    scheduler = lr_scheduler(tc.lr_scheduler_type, optimizer, warmup, steps)
    config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

    # Resume: LoRA tensors, optimizer, scheduler, RNG and data position.
    state = {"step": 0, "samples_seen": 0, "elapsed": 0.0, "world_size": world.size}
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        distributed.check_resume(world, state, tc.per_device_train_batch_size, tc.gradient_accumulation_steps)
        state["world_size"] = world.size
        log(f"resumed from {ckpt} at step {state['step']}")
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml, encoding="utf-8")
    logger = RunLogger(out, steps, state["step"], enabled=world.main, progress_bar=tc.progress_bar,
                       elapsed=state["elapsed"])
    pad_id = tokenizer.pad_token_id
    eval_subset = eval_set[:tc.eval_max_samples] if tc.eval_max_samples > 0 else eval_set

    def run_eval(step: int) -> Dict[str, float]:
        if not eval_subset:  # no eval set (data.eval_fraction=0): nothing to evaluate
            return {}
        m = evaluate(loss_fn, eval_subset, cfg, pad_id, device, world, autocast)
        logger.write({"step": step, **m})
        logger.print(f"step {step}: eval_loss {m['eval_loss']:.4f}  perplexity {m['eval_perplexity']:.2f}")
        return m

    metrics = run_eval(0) if state["step"] == 0 else {}
    batches = micro_batches(train_set, state["samples_seen"], tc.per_device_train_batch_size, world,
                            tc.seed, dc.shuffle)
    window = {"loss": torch.zeros(()), "labels": torch.zeros(()), "tokens": 0, "t": logger.elapsed()}
    grad_norm = torch.zeros(())
    while state["step"] < steps:
        # Dropout draws from (seed, rank, step): ranks differ, and a resume replays them exactly.
        torch.manual_seed(distributed.step_seed(tc.seed, world.rank, state["step"]))
        # One optimizer step: accumulate micro-batches, normalised by the label tokens of all of
        # them on all ranks, so every label token weighs the same (no mean of means).
        micro = [collate(next(batches), pad_id, dc.packing, dc.max_length)
                 for _ in range(tc.gradient_accumulation_steps)]
        (n_labels,) = distributed.all_sum(world, sum(b["num_label_tokens"] for b in micro))
        scale = world.size / n_labels.clamp(min=1).item()  # DDP averages over ranks: undo that
        for i, b in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if (last or not world.enabled) else loss_fn.no_sync()
            with sync, autocast():
                loss_sum, n = loss_fn(to_device(b, device))
                (loss_sum.float() * scale).backward()
            window["loss"] += loss_sum.detach().float().cpu()
            window["labels"] += n.cpu()
            window["tokens"] += int(b["num_tokens"])
        # The norm is logged either way; max_grad_norm 0 means no clipping.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0
                                                   else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["samples_seen"] += tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world.size
        step = state["step"]

        if step % tc.logging_steps == 0 or step == steps:
            loss, labels, tokens = distributed.all_sum(world, window["loss"], window["labels"],
                                                       torch.tensor(float(window["tokens"])))
            now = logger.elapsed()
            rec = {"step": step, "loss": round((loss / labels.clamp(min=1)).item(), 6),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 6),
                   "tokens": int(tokens.item()), "tokens_per_s": round(tokens.item() / max(now - window["t"], 1e-9), 1),
                   "epoch": round(state["samples_seen"] / len(train_set), 4)}
            logger.write(rec)
            logger.progress(0, loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window = {"loss": torch.zeros(()), "labels": torch.zeros(()), "tokens": 0, "t": now}
        logger.progress(1)
        if tc.eval_steps > 0 and step % tc.eval_steps == 0 and step != steps:
            metrics = run_eval(step)
        if tc.save_steps > 0 and step % tc.save_steps == 0:
            state["elapsed"] = logger.elapsed()
            if world.main:
                save_checkpoint(out, step, model, optimizer, scheduler, dict(state), config_yaml,
                                tc.save_total_limit)
            distributed.barrier(world)

    metrics = run_eval(state["step"])
    if world.main:
        save_adapter(model, out, base_path, pc)
        tokenizer.save_pretrained(str(out))
        plot_losses(out)
        logger.print(f"adapter saved to {out} (PEFT format)")
    logger.close()
    distributed.teardown(world)
    return TrainResult(metrics, out, model, tokenizer, eval_subset, world.main)
