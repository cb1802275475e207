"""One benchmark run of one system, in its own process: ``python -m philora.bench_worker SYSTEM``.

Started by ``philora bench`` (bench.py), which reads the JSON line this prints: non-pad tokens/s
over the steps after ``--warmup``, peak RSS (CPU; ``ru_maxrss`` of this process) or peak CUDA
memory allocated, and the per-step losses. philora runs its own pieces as ``train.py`` does
(loading, inject_lora, CausalLMLoss, packing collate, AdamW, grad-norm clipping); TRL runs
``SFTTrainer`` with a PEFT ``LoraConfig``. Both see the same examples in the same order.
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from .bench import LORA, LR, SYSTEMS

class Clock:
    """Times steps after ``warmup`` (their data, forward, backward, optimizer), keeps losses."""

    def __init__(self, warmup: int):
        import torch
        self.warmup, self.losses, self.t0, self.t1 = warmup, [], None, None
        self.sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def step_done(self, step: int) -> None:
        self.sync()
        now = time.perf_counter()
        if step == self.warmup:
            self.t0 = now
        self.t1 = now


def run_philora(d: Path, spec: dict, examples: List[dict], args, clock: Clock, profiler) -> None:
    import torch
    from .batching import collate
    from .config import ModelConfig
    from .inject import inject_lora
    from .loading import load_model_and_tokenizer, pick_device
    from .loss import CausalLMLoss
    device = pick_device()
    cuda = device.type == "cuda"
    attn = "flash_attention_2" if cuda and _has_flash() else "philora_sdpa"
    mc = ModelConfig(name_or_path=str(d), dtype=spec["dtype"], attn_implementation=attn,
                     gradient_checkpointing=spec.get("checkpointing", False))
    model, tok, _ = load_model_and_tokenizer(mc, device)
    inject_lora(model, target_modules="all-linear", **LORA)
    loss_fn = CausalLMLoss(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)  # as train.py; constant LR as TRL here
    amp = torch.autocast("cuda", dtype=model.dtype) if cuda and model.dtype != torch.float32 else None
    for step in range(1, args.steps + 1):
        batch = collate(examples[(step - 1) * args.batch:step * args.batch], tok.pad_token_id, True,
                        args.max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp or torch.autocast("cpu", enabled=False):
            loss_sum, n = loss_fn(batch)
        (loss_sum / n.clamp(min=1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.losses.append((loss_sum / n).item())
        clock.step_done(step)
        if profiler is not None:
            profiler.step()


def run_trl(d: Path, spec: dict, examples: List[dict], args, clock: Clock, profiler) -> None:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(
        d, dtype=dtype, attn_implementation="flash_attention_2" if cuda and _has_flash() else "sdpa")

    class Hook(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # logging_steps=1: this step's loss
                clock.losses.append(logs["loss"])

        def on_step_end(self, a, state, control, **kw):
            clock.step_done(state.global_step)
            if profiler is not None:
                profiler.step()

    cfg = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-", dir=d), per_device_train_batch_size=args.batch,
                    max_length=None if spec["padding_free"] else args.max_length, packing=False,
                    padding_free=spec["padding_free"],  # (inputs are already <= max_length)
                    bf16=cuda, gradient_checkpointing=False, learning_rate=LR, lr_scheduler_type="constant",
                    max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
                    train_sampling_strategy="sequential", dataloader_num_workers=0, disable_tqdm=True,
                    use_cpu=not cuda, seed=args.seed)
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(examples[:args.steps * args.batch]),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **LORA),
                         callbacks=[Hook()])
    trainer.train()


def _has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def worker(args) -> int:
    import torch
    from transformers import set_seed
    set_seed(args.seed)  # LoRA init and dropout masks; the data and its order never change
    d = Path(args.dir)
    spec = SYSTEMS[args.worker]
    examples = [json.loads(line) for line in (d / "data.jsonl").read_text().splitlines()]
    clock = Clock(args.warmup)
    run = run_philora if spec["kind"] == "philora" else run_trl
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts, schedule=schedule(wait=0, warmup=args.warmup, active=args.steps)) as p:
            run(d, spec, examples, args, clock, p)
        print(json.dumps({"profile": op_families(p)}))
        return 0
    run(d, spec, examples, args, clock, None)
    timed = examples[args.warmup * args.batch:args.steps * args.batch]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"tokens_per_s": sum(len(e["input_ids"]) for e in timed) / (clock.t1 - clock.t0),
                      "peak_bytes": peak, "loss": statistics.mean(clock.losses[-args.loss_steps:]),
                      "losses": clock.losses}))
    return 0


FAMILIES = [("attention", ("attention", "sdpa", "softmax", "bmm", "baddbmm", "tril", "where")),
            ("matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
            ("dropout (RNG)", ("bernoulli", "dropout", "random_", "rand", "_Masked")),
            ("loss / LM head", ("logsumexp", "exp", "cross_entropy", "log_softmax", "_FrozenHeadCE", "nll")),
            ("optimizer", ("adam", "lerp", "addcdiv", "addcmul", "sqrt", "_foreach", "norm")),
            ("copies / cat / index", ("copy_", "cat", "index", "gather", "scatter", "contiguous", "clone", "stack")),
            ("elementwise", ("mul", "add", "sub", "div", "silu", "pow", "rsqrt", "mean", "neg", "fill_",
                             "zero_", "sum", "cos", "sin", "to"))]


def op_families(prof) -> Dict[str, dict]:
    """Self time (s) per op family and its three biggest ops (outer frames have no self time)."""
    out: Dict[str, dict] = {}
    for e in prof.key_averages():
        t = e.self_cpu_time_total / 1e6 + getattr(e, "self_device_time_total", 0) / 1e6
        if t <= 0:
            continue
        fam = next((f for f, keys in FAMILIES if any(k in e.key for k in keys)), "other")
        f = out.setdefault(fam, {"s": 0.0, "ops": {}})
        f["s"] += t
        f["ops"][e.key] = t
    for f in out.values():
        f["ops"] = dict(sorted(f["ops"].items(), key=lambda kv: -kv[1])[:3])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["s"]))


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m philora.bench_worker")
    ap.add_argument("worker", choices=list(SYSTEMS))
    ap.add_argument("--dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--loss-steps", type=int, default=5)
    ap.add_argument("--profile", default=None)
    return worker(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
