"""The training loop: LoRA SFT of a causal LM on chat data, one readable function.

Hand-written (not transformers' Trainer / TRL) because the loop is the product's fast path:
padding-free packing, a loss that never materialises full logits, accumulation normalised by
label tokens, exact resume. Everything around it (models, tokenizers, DDP, TensorBoard) comes
from the usual libraries. ``_train`` reads top to bottom: open the run (start.py), load data and
model, apply every model patch in order (model/prepare.py), the learning rate as a function of
the step (schedule.py), the loop (one optimizer step: step.py; its log records: window.py), and
the close, which ``train``'s ExitStack does on every exit path.
"""

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List

import torch

from ..core.config import Config, config_to_dict
from ..core.diskio import staged, write_text
from ..core.errors import PhiloraError
from ..data.examples import epoch_size
from ..model.adapter import save_adapter
from ..model.loading import RUN_CONFIG, load_model_and_tokenizer, load_tokenizer, resolve_path
from ..model.prepare import Process, prepare
from . import distributed
from .batches import micro_batches, row_capacity, to_device
from .checkpoint import nonfinite, save_checkpoint, trainable_state
from .distributed import World
from .evalgen import eval_generations
from .metrics import RunLogger, plot_losses
from .objective import averages, collate_for, keep_reference, load_data, loss_object, reference, sequences, take_metrics
from .optim import advice, make_optimizer
from .outdir import remove_run
from .schedule import Schedule, schedule, total_steps
from .serving import rope_regimes, write_notes
from .start import Opened, open_run, resume_state, run_config_yaml
from .step import optimizer_step
from .trackers import Trackers
from .window import Window


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


@torch.no_grad()
def evaluate(loss_fn, examples: List[dict], cfg: Config, pad_id: int, device: torch.device,
             world: World = World(), autocast=contextlib.nullcontext) -> Dict[str, float]:
    """Loss per label token and perplexity over ``examples`` (sharded over ranks), batched and
    packed as ``cfg`` says: the one eval loss of training, ``philora eval`` and the report.
    Preference objectives: loss per pair and the objective's metrics (eval_rewards/...)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count, sums = torch.zeros(()), torch.zeros(()), {}
    batch, dc, collate = cfg.training_config.per_device_eval_batch_size, cfg.data, collate_for(cfg)
    for part, counted in distributed.eval_batches(world, examples, batch):
        b = to_device(collate(part, pad_id, dc.packing, dc.max_length), device)
        with autocast():
            loss_sum, n = loss_fn(b)
        taken = take_metrics(loss_fn)
        if counted:
            total += loss_sum.float().cpu()
            count += n.cpu()
            sums = {k: sums.get(k, 0.0) + v for k, v in taken.items()}
    total, count = distributed.all_sum(world, total, count)
    loss_fn.train(was_training)
    loss = (total / count.clamp(min=1)).item()
    if cfg.training_config.objective != "sft":
        return {"eval_loss": loss, **averages(world, sums, prefix="eval_")}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


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


@dataclass
class Loop:
    """What the loop's evaluations and checkpoints share."""
    run: Opened
    cfg: Config
    model: torch.nn.Module
    tokenizer: object
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    logger: RunLogger
    autocast: Callable
    state: dict  # step, samples_seen, elapsed, world_size: trainer_state.json
    config_yaml: str
    eval_set: List[dict]

    def evaluate(self, step: int) -> Dict[str, float]:
        """Eval loss (logged), and with eval_generations the generations (rank 0, on the plain
        model; its error stops every rank); {} without an eval set (data.eval_fraction=0)."""
        if not self.eval_set:
            return {}
        tc, world, logger = self.cfg.training_config, self.run.world, self.logger
        m = evaluate(self.loss_fn, self.eval_set, self.cfg, self.tokenizer.pad_token_id, self.run.device, world,
                     self.autocast)
        logger.write({"step": step, **m})
        shown = (f"perplexity {m['eval_perplexity']:.2f}" if "eval_perplexity" in m else
                 f"rewards/accuracies {m.get('eval_rewards/accuracies', 0):.3f}  margins {m.get('eval_rewards/margins', 0):.4f}")
        logger.print(f"step {step}: eval_loss {m['eval_loss']:.4f}  {shown}")
        if tc.eval_generations:
            distributed.on_main(world, lambda: logger.write({"step": step, "generations": eval_generations(
                self.model, self.tokenizer, self.eval_set[:tc.eval_generations])}))
        return m

    def save(self, step: int, window: Window, **extra) -> Path:
        """checkpoint-STEP, written by rank 0 (an error there stops every rank), with this log
        window's global sums so a resume logs the same records."""
        self.state["elapsed"] = self.logger.elapsed()
        saved = dict(self.state, window=window.saved(self.run.world), **extra)
        return distributed.on_main(self.run.world, lambda: save_checkpoint(
            self.run.out, step, self.model, self.optimizer, self.schedule.record(step), saved, self.config_yaml,
            self.cfg.training_config.save_total_limit))


def open_logger(run: Opened, cfg: Config, steps: int, state: dict, held: contextlib.ExitStack) -> RunLogger:
    """metrics.jsonl, TensorBoard, the progress bar and (rank 0) the trackers' runs: MLflow, W&B,
    trackio, finished (or marked failed) and closed when ``held`` closes."""
    tc, opened = cfg.training_config, []
    distributed.on_main(run.world, lambda: opened.append(held.enter_context(
        Trackers(run.out, run.report_to, config_to_dict(cfg), resume=run.ckpt is not None))))
    logger = RunLogger(run.out, steps, state["step"], enabled=run.world.main, progress_bar=tc.progress_bar,
                       elapsed=state["elapsed"], tensorboard="tensorboard" in run.report_to,
                       trackers=opened[0] if opened else None)
    held.callback(logger.close, quiet=True)  # a run that fails lets go of its files (no-op after close())
    return logger


def check_bad_steps(cfg: Config, step: int, bad_steps: int, logger: RunLogger) -> None:
    """After a non-finite step: a warning, or, ``max_bad_steps`` in a row, the end of the run."""
    limit = cfg.training_config.max_bad_steps
    if bad_steps >= limit:
        raise PhiloraError(
            f"training stopped at step {step}: {bad_steps} step(s) in a row had a NaN or infinite loss or "
            f"gradient norm (training_config.max_bad_steps={limit}); the weights were last "
            f"updated at step {step - bad_steps} and no adapter was saved; lower "
            f"training_config.learning_rate, keep max_grad_norm > 0, or train in float32 (model.dtype)")
    if bad_steps:
        logger.print(f"philora: warning: step {step}: NaN or infinite loss or gradient norm; the update "
                     f"was skipped ({bad_steps} in a row; {limit} in a row stop the run)")


def finish(loop: Loop) -> Dict[str, float]:
    """After the adapter is saved: the final eval (unless a signal came), the loss plot, the
    logger's files closed, the process group left; returns the final eval metrics."""
    world, guard, out, logger = loop.run.world, loop.run.guard, loop.run.out, loop.logger
    (stop,) = distributed.all_sum(world, torch.tensor(float(guard.requested)))
    skipped = (f"the adapter is saved in {out}; the final evaluation and report were skipped "
               f"(`philora eval {out} --out DIR` makes them)")
    if stop:
        raise guard.interrupted(skipped)
    guard.immediate(skipped)
    metrics = loop.evaluate(loop.state["step"])
    if world.main:
        try:
            plot_losses(out)
        except PhiloraError as e:  # the run is saved: a plot that cannot be written is a warning
            logger.print(f"philora: warning: {e}")
    logger.close()
    distributed.teardown(world)
    return metrics


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune per ``cfg``; writes everything to output_dir and returns what the end-of-run
    report needs (``report.end_of_run`` makes it; the CLI does so after every run). The
    output_dir's lock, the SIGTERM/SIGINT handlers, the trackers, the logger's files and the
    NEFTune hooks are held for the call and released however it ends (``held``); a signal stops
    the run after the current step with a checkpoint (preempt.Interrupted)."""
    with contextlib.ExitStack() as held:
        return _train(cfg, resume, overwrite, held)


def _train(cfg: Config, resume: bool, overwrite: bool, held: contextlib.ExitStack) -> TrainResult:
    tc, dc = cfg.training_config, cfg.data
    run = open_run(cfg, resume, overwrite, held)
    world, guard, out, device, log = run.world, run.guard, run.out, run.device, run.log

    # Tokenizer and data, then the model: a bad record is reported before a large model loads.
    # The model resolved once (a GGUF file converted or found, said in one line), then passed on.
    model_cfg = replace(cfg.model, name_or_path=resolve_path(cfg.model.name_or_path))
    tokenizer = load_tokenizer(model_cfg.name_or_path, model_cfg.trust_remote_code, model_cfg.revision)
    # One process per node tokenizes (or finds the cache); the node's others then map its files.
    train_set, eval_set = distributed.local_first(world, lambda: load_data(cfg, tokenizer, log))
    distributed.check_run(world, cfg, epoch_size(train_set))
    model, tokenizer, base_path = load_model_and_tokenizer(model_cfg, device, training=True)
    for warning in advice(cfg, world.size):  # learning rate, batch size: once, before training
        log(f"philora: warning: {warning}")
    amp = device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=model.dtype)) if amp else contextlib.nullcontext
    # Every model patch, in order (model/prepare.py); the loss object is the objective.
    proc = Process(device, held, autocast, log=log,
                   agree=lambda on: bool(distributed.all_sum(world, torch.tensor(float(on)))[0] > 0),
                   wrap=(lambda m: distributed.wrap(m, device, tc.fsdp)) if world.enabled else (lambda m: m))
    loss_fn = prepare(model, loss_object(model, cfg), cfg, sequences(cfg, train_set), tokenizer.pad_token_id, proc)
    # DPO: the step-0 model's log-probs of every pair, before any step (objective.py)
    train_set, eval_set, ref = reference(run, cfg, model, train_set, eval_set, tokenizer.pad_token_id, autocast)
    regimes = rope_regimes(model.config, sequences(cfg, train_set))  # LongRoPE: which factor set(s) this run trains
    if regimes:
        log(regimes["advice"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, cfg)  # AdamW; LoRA+'s groups with peft_config.loraplus_lr_ratio
    steps = total_steps(cfg, epoch_size(train_set), world.size)
    lrs = schedule(cfg, optimizer, steps)  # get_lr(step) for each parameter group
    state = resume_state(run, cfg, model, optimizer)  # LoRA tensors, optimizer, RNG, data position
    config_yaml = run_config_yaml(cfg, run.ckpt, run.applied)
    if world.main:
        remove_run(run.old_run)  # --overwrite: only now that data, tokenizer and model have loaded
        write_text(out / RUN_CONFIG, config_yaml)
    keep_reference(run, ref, train_set, eval_set)
    guard.immediate("stopped before the first step, nothing trained: start again with --overwrite" if run.ckpt is None
                    else f"stopped before training resumed; {run.ckpt.name} is as it was: --resume again")
    logger = open_logger(run, cfg, steps, state, held)
    loop = Loop(run, cfg, model, tokenizer, loss_fn, optimizer, lrs, logger, autocast, state, config_yaml,
                eval_set[:tc.eval_max_samples] if tc.eval_max_samples > 0 else eval_set)

    if state["step"] == 0:
        loop.evaluate(0)
    if state.pop("eval_pending", False):  # a signal stopped the run before this eval
        loop.evaluate(state["step"])
    batches = micro_batches(train_set, state["samples_seen"], tc.per_device_train_batch_size, world,
                            tc.seed, dc.shuffle)
    row = row_capacity(model, dc.max_length)  # packed rows: one per micro-batch where attention allows
    window = Window.resumed(state.pop("window", None), logger.elapsed(), world.main)
    grad_norm, bad_steps = torch.zeros(()), 0
    guard.defer()  # from here a signal stops the run after the current step, with a checkpoint
    while state["step"] < steps:
        lrs.apply(optimizer, state["step"])
        # Dropout draws from (seed, rank, step): ranks differ, and a resume replays them exactly.
        torch.manual_seed(distributed.step_seed(tc.seed, world.rank, state["step"]))
        micro = [collate_for(cfg)(next(batches), tokenizer.pad_token_id, dc.packing, row)
                 for _ in range(tc.gradient_accumulation_steps)]
        done = optimizer_step(loss_fn, optimizer, params, micro, world, device, autocast, tc.max_grad_norm,
                              lambda: guard.requested)
        window.add(done, take_metrics(loss_fn))
        grad_norm = grad_norm if done.bad else done.norm
        bad_steps = bad_steps + 1 if done.bad else 0
        state["step"] += 1
        state["samples_seen"] += tc.per_device_train_batch_size * tc.gradient_accumulation_steps * world.size
        step = state["step"]
        check_bad_steps(cfg, step, bad_steps, logger)
        if step % tc.logging_steps == 0 or step == steps:
            rec, now = window.record(world, logger.elapsed, step, lrs.lrs(step)[0], grad_norm,
                                     state["samples_seen"] / epoch_size(train_set))
            logger.write(rec)
            logger.progress(0, loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "-",
                            lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            window = Window(now)
        logger.progress(1)
        if done.stop and step < steps:  # SIGTERM/SIGINT: checkpoint now; a due eval is the resumed run's first
            saved = loop.save(step, window, eval_pending=tc.eval_steps > 0 and step % tc.eval_steps == 0)
            raise guard.interrupted(f"stopped after step {step} with a checkpoint in {saved}; continue "
                                    f"with the same command and --resume")
        if tc.eval_steps > 0 and step % tc.eval_steps == 0 and step != steps:
            loop.evaluate(step)
        if tc.save_steps > 0 and step % tc.save_steps == 0:
            loop.save(step, window)

    # The adapter first (small, quick: saved even if a scheduler's kill follows), then the final eval.
    distributed.on_main(world, lambda: save_final_adapter(model, tokenizer, out, base_path, cfg.peft_config))
    distributed.on_main(world, lambda: write_notes(out, base_path, regimes))  # README, longrope.json
    logger.print(f"adapter saved to {out} (PEFT format)")
    metrics = finish(loop)
    return TrainResult(metrics, out, model, tokenizer, loop.eval_set, world.main)
