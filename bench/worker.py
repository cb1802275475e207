"""One benchmark run of one system, in its own process: ``python bench/worker.py JOB.json OUT.json``.

Started by ``bench/run.py`` and ``bench/qlora.py``, which write the job (system, model
directory, steps, batch, seed, ...) and read the result this writes: non-pad tokens/s over the
steps after ``warmup``, per-step losses, memory (below), and ``first_step_at``: the wall-clock time
(``time.time()``) the first optimizer step ended, from which ``bench/run.py`` takes the start-up
(process start to the end of the first step: imports, data, model load, first step).

* ``philora``: ``philora.run.train.train`` itself, the loop ``philora train`` runs, with a config
  built for the benchmark (the messages JSONL of the run, no shuffle, packing, logging every
  step, constant LR, no eval, checkpoints, report or progress bar). Speed and losses are the
  run's own ``metrics.jsonl`` records (``tokens``, ``tokens_per_s``, ``loss`` per step).
* ``trl``: ``SFTTrainer`` with a PEFT ``LoraConfig`` on the same tokens (``tokens.jsonl``),
  timed from its step-end callback, losses from its log callback; ``malloc``: the allocator its
  process has mapped (``trl-*-tcmalloc``: TCMalloc, preloaded as for ``philora train``).

Memory: a one-shot global forward pre-hook marks the end of loading (the first forward pass of
any module): it reads the peak so far (``load_peak_bytes``), the bytes of the frozen weights and
buffers (``weights``), and resets the high-water mark (``/proc/self/clear_refs``, or CUDA's peak
statistics), so ``train_peak_bytes`` is the peak of training alone (and of what ``train`` does
after its last step: saving the adapter, plotting the loss). ``peak_bytes`` is the process's
peak (the larger of the two); ``rss_baseline`` is the RSS before the run, with the system's main
libraries imported (and only those: the peak is the system's whole process).

``"profile": true`` in the job: torch.profiler over the steps after ``warmup`` (stepped by a
global optimizer-step hook, so the loop itself is untouched), self time summed by op family.
"""

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def rss(field: str = "VmRSS") -> int:
    """Resident memory in bytes: now (VmRSS) or the high-water mark (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the VmHWM high-water mark
            f.write("5")
        return True
    except OSError:
        return False


class Memory:
    """Peak memory of loading (up to the first forward pass) and of training (after it)."""

    def __init__(self):
        import torch
        self.torch, self.cuda = torch, torch.cuda.is_available()
        self.baseline = None if self.cuda else rss()
        self.load_peak, self.weights, self.reset = None, None, self.cuda
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._first_forward)

    def _first_forward(self, module, args) -> None:
        self.handle.remove()
        frozen = [p for p in module.parameters() if not p.requires_grad]
        self.weights = sum(t.numel() * t.element_size() for t in [*frozen, *module.buffers()])
        if self.cuda:
            self.load_peak = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.load_peak = rss("VmHWM")
            self.reset = reset_peak_rss()

    def result(self) -> dict:
        self.handle.remove()
        end = self.torch.cuda.max_memory_allocated() if self.cuda else rss("VmHWM")
        load = end if self.load_peak is None else self.load_peak
        return {"peak_bytes": max(load, end), "load_peak_bytes": load,
                "train_peak_bytes": end if self.reset else None, "rss_baseline": self.baseline,
                "weights": self.weights, "cuda": self.cuda}


def has_flash() -> bool:
    try:
        import flash_attn  # noqa: F401
        return True
    except ImportError:
        return False


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_philora(job: dict, d: Path, work: Path) -> dict:
    """``philora.run.train.train`` on the benchmark config; speed and losses from its metrics.jsonl."""
    import torch

    from philora.core.config import Config, DataConfig, ModelConfig, PeftConfig, TrainingConfig
    from philora.run.train import train
    spec = job["spec"]
    attn = "flash_attention_2" if torch.cuda.is_available() and has_flash() else "philora_sdpa"
    out = work / "run"
    cfg = Config(
        model=ModelConfig(name_or_path=str(d / "model"), dtype=spec.get("dtype", "auto"),
                          attn_implementation=attn, gradient_checkpointing=spec.get("checkpointing", False),
                          quantization=spec.get("quantization"), compute_dtype=spec.get("compute_dtype", "auto")),
        data=DataConfig(train=str(d / "train.jsonl"), eval=None, eval_fraction=0.0, format="messages",
                        max_length=job["max_length"], packing=True, shuffle=False),
        training_config=TrainingConfig(
            output_dir=str(out), learning_rate=job["lr"], max_steps=job["steps"],
            per_device_train_batch_size=job["batch"], gradient_accumulation_steps=1, warmup_steps=0,
            warmup_ratio=0.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            seed=job["seed"], logging_steps=1, eval_steps=0, save_steps=0, report_samples=0,
            progress_bar=False),
        peft_config=PeftConfig(target_modules="all-linear", **job["lora"]))
    train(cfg)
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "tokens_per_s" in r]
    if [r["step"] for r in steps] != list(range(1, job["steps"] + 1)):
        raise RuntimeError(f"metrics.jsonl has steps {[r['step'] for r in steps]}, expected 1..{job['steps']}")
    expected = sum(len(e["input_ids"]) for e in read_jsonl(d / "tokens.jsonl")[:job["steps"] * job["batch"]])
    if sum(r["tokens"] for r in steps) != expected:  # train() saw other tokens than TRL does
        raise RuntimeError(f"philora trained {sum(r['tokens'] for r in steps)} tokens, the data has {expected}")
    from philora.run.allocator import active
    return {"steps": [{k: r[k] for k in ("step", "tokens", "tokens_per_s", "loss")} for r in steps],
            "malloc": active()}  # TCMalloc when bench/run.py preloaded it, as `philora train` does


def run_trl(job: dict, d: Path, work: Path) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    examples = read_jsonl(d / "tokens.jsonl")[:job["steps"] * job["batch"]]
    tok = AutoTokenizer.from_pretrained(d / "model")
    model = AutoModelForCausalLM.from_pretrained(
        d / "model", dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation="flash_attention_2" if cuda and has_flash() else "sdpa")
    ends: Dict[int, float] = {}
    losses: List[float] = []

    class Hook(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:  # logging_steps=1: this step's loss
                losses.append(logs["loss"])

        def on_step_end(self, a, state, control, **kw):
            sync()
            ends[state.global_step] = time.perf_counter()

    spec = job["spec"]
    cfg = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=job["batch"],
                    max_length=None if spec["padding_free"] else job["max_length"], packing=False,
                    padding_free=spec["padding_free"],  # (inputs are already <= max_length)
                    bf16=cuda, gradient_checkpointing=False, learning_rate=job["lr"],
                    lr_scheduler_type="constant", max_steps=job["steps"], logging_steps=1,
                    save_strategy="no", report_to="none", train_sampling_strategy="sequential",
                    dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda, seed=job["seed"])
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(examples),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **job["lora"]),
                         callbacks=[Hook()])
    trainer.train()
    steps = []
    for s in range(1, job["steps"] + 1):
        tokens = sum(len(e["input_ids"]) for e in examples[(s - 1) * job["batch"]:s * job["batch"]])
        steps.append({"step": s, "tokens": tokens, "loss": losses[s - 1] if s <= len(losses) else None,
                      "tokens_per_s": tokens / (ends[s] - ends[s - 1]) if s - 1 in ends else None})
    from philora.run.allocator import active  # (trl-*-tcmalloc: preloaded by bench/run.py)
    return {"steps": steps, "malloc": active()}


FAMILIES = [("attention", ("attention", "sdpa", "softmax", "bmm", "baddbmm", "tril", "where")),
            ("matmul", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
            ("dropout (RNG)", ("bernoulli", "dropout", "random_", "rand", "_Masked")),
            ("loss / LM head", ("logsumexp", "exp", "cross_entropy", "log_softmax", "_FrozenHeadCE", "nll")),
            ("optimizer", ("adam", "lerp", "addcdiv", "addcmul", "sqrt", "_foreach", "norm")),
            ("copies / cat / index", ("copy_", "cat", "index", "gather", "scatter", "contiguous", "clone", "stack")),
            ("elementwise", ("mul", "add", "sub", "div", "silu", "pow", "rsqrt", "mean", "neg", "fill_",
                             "zero_", "sum", "cos", "sin", "to")),
            ("python, logging (between ops)", ("ProfilerStep",))]


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


def worker(job: dict) -> dict:
    # Each system imports only what its run imports (whole-process time and peak RSS are the
    # system's own): philora.run.train for philora; transformers, TRL, PEFT and datasets for TRL,
    # whose import of PEFT also pulls in bitsandbytes and torch._dynamo. train() seeds itself;
    # TRL's LoRA init and dropout follow transformers.set_seed.
    import torch
    if job["spec"]["kind"] == "philora":
        import philora.run.train  # noqa: F401
    else:
        import datasets  # noqa: F401
        import transformers
        import trl  # noqa: F401
        transformers.set_seed(job["seed"])
    d = Path(job["dir"])
    run = run_philora if job["spec"]["kind"] == "philora" else run_trl
    work = Path(tempfile.mkdtemp(prefix="run-", dir=d))
    try:
        if job.get("profile"):
            from torch.optim.optimizer import register_optimizer_step_post_hook
            from torch.profiler import ProfilerActivity, profile, schedule
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            sched = schedule(wait=0, warmup=job["warmup"], active=job["steps"] - job["warmup"], repeat=1)
            with profile(activities=acts, schedule=sched) as p:
                hook = register_optimizer_step_post_hook(lambda *a: p.step())  # one optimizer step each
                try:
                    run(job, d, work)
                finally:
                    hook.remove()
            return {"profile": op_families(p)}
        from torch.optim.optimizer import register_optimizer_step_post_hook
        first: List[float] = []
        hook = register_optimizer_step_post_hook(lambda *a: first.append(time.time()) if not first else None)
        memory = Memory()
        result = run(job, d, work)
        hook.remove()
        result.update(memory.result(), first_step_at=first[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = [s for s in result["steps"] if s["step"] > job["warmup"]]
    losses = [s["loss"] for s in result["steps"]]
    result.update(system=job["system"], losses=losses, loss=statistics.mean(losses[-job["loss_steps"]:]),
                  tokens_per_s=sum(s["tokens"] for s in timed) / sum(s["tokens"] / s["tokens_per_s"] for s in timed))
    return result


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        print("usage: python bench/worker.py JOB.json OUT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = worker(job)
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
