"""``python bench/dpo.py``: DPO, ``philora train`` against TRL's DPOTrainer + PEFT, same run, whole process.

    python bench/dpo.py                          # CPU shape (bench/run.py's 59M Phi-3), 2 alternating runs each
    python bench/dpo.py --quick                  # the tiny shape, a few steps: a smoke test

Both systems train one epoch of the same pairs (so both see exactly the same tokens) with LoRA r=16 on
every linear layer, no dropout (TRL's DPO turns dropout off), constant LR, beta 0.1, batch ``--batch``
pairs, max_length 512, fp32 on CPU. Each run is a fresh process, timed from start to exit, and its
peak RSS is the kernel's (``os.wait4``'s ru_maxrss of that process): everything counts, imports,
model loading, tokenizing, and philora's one pass for the reference log-probs as well as TRL's
reference forward every step. philora runs as users run it (``python -m philora train cfg.yaml``:
TCMalloc when the machine has it, packing, philora_sdpa); TRL is ``DPOTrainer(model, peft_config=...)``
on the same conversational pairs (its own tokenization; its completions keep one template token
more per sequence, the "\\n" after the end-of-turn token, which favours philora by a token per
sequence), with ``gradient_checkpointing=False`` and ``bf16=False`` (its defaults are on) and
precompute_ref_log_probs off (its default). Tokens/s = the pairs' tokens (chosen and rejected
sequences, prompt included, as philora counts them) / wall time; "steady" is the median per-step
rate after the first step, from philora's metrics.jsonl and a TRL callback.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import SHAPES, make_conversations, make_model_dir  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def make_pairs(d: Path, n: int, shape: dict, seed: int = 0) -> int:
    """``pairs.jsonl`` (TRL's conversational explicit-prompt form): each synthetic conversation's
    reply is chosen, another's rejected. Returns the tokens philora will train on."""
    from transformers import AutoTokenizer

    from philora.core.config import DataConfig
    from philora.data.preference import load_pairs
    tok = AutoTokenizer.from_pretrained(d / "model")
    convs = make_conversations(tok, 2 * n, shape["lengths"], seed)
    with open(d / "pairs.jsonl", "w", encoding="utf-8") as f:
        for k in range(n):
            a, b = convs[2 * k]["messages"], convs[2 * k + 1]["messages"]
            f.write(json.dumps({"prompt": a[:1], "chosen": a[1:], "rejected": b[1:]}) + "\n")
    pairs, _ = load_pairs(str(d / "pairs.jsonl"), "train", DataConfig(max_length=shape["max_length"]), tok,
                          log=lambda _: None)
    return sum(len(p["chosen"]) + len(p["rejected"]) for p in pairs)


def philora_config(d: Path, out: Path, n: int, batch: int, max_length: int) -> Path:
    cfg = {"model": {"name_or_path": str(d / "model"), "dtype": "float32", "attn_implementation": "philora_sdpa"},
           "data": {"train": str(d / "pairs.jsonl"), "eval_fraction": 0.0, "max_length": max_length,
                    "packing": True, "shuffle": False},
           "training_config": {"objective": "dpo", "beta": 0.1, "output_dir": str(out), "learning_rate": 5e-5,
                               "max_steps": n // batch, "per_device_train_batch_size": batch,
                               "lr_scheduler_type": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
                               "seed": 0, "logging_steps": 1, "eval_steps": 0, "save_steps": 0,
                               "report_samples": 0, "progress_bar": False, "report_to": "none"},
           "peft_config": LORA}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def trl_worker(d: str, out: str, n: int, batch: int, max_length: int) -> None:
    """TRL's side, in its own process: DPOTrainer + PEFT, per-step end times to out/steps.json."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    ends = []

    class Hook(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(Path(d) / "model")
    model = AutoModelForCausalLM.from_pretrained(Path(d) / "model", dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in open(Path(d) / "pairs.jsonl", encoding="utf-8")]
    args = DPOConfig(output_dir=out, beta=0.1, per_device_train_batch_size=batch, max_length=max_length,
                     learning_rate=5e-5, lr_scheduler_type="constant", max_steps=n // batch, logging_steps=1,
                     save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
                     use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(task_type="CAUSAL_LM", **LORA)
    DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
               peft_config=lora, callbacks=[Hook()]).train()
    Path(out, "steps.json").write_text(json.dumps(ends))


def timed(cmd, env) -> dict:
    """Run ``cmd`` to its end: wall seconds and the peak RSS (MiB) of the process (os.wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{out.decode(errors='replace')[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}


def one_run(system: str, d: Path, work: Path, n: int, batch: int, max_length: int, tokens: int) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=str(HERE.parent / "src"), HF_HUB_OFFLINE="1")
    out = work / f"{system}-{time.monotonic_ns()}"
    if system == "philora":
        cfg = philora_config(d, out, n, batch, max_length)
        res = timed([sys.executable, "-m", "philora", "train", str(cfg)], env)
        recs = [json.loads(x) for x in open(out / "metrics.jsonl") if '"tokens_per_s"' in x]
        steady = statistics.median(r["tokens_per_s"] for r in recs[1:]) if len(recs) > 1 else None
        if sum(r["tokens"] for r in recs) != tokens:
            raise RuntimeError(f"philora trained {sum(r['tokens'] for r in recs)} tokens, the pairs have {tokens}")
    else:
        out.mkdir(parents=True)
        res = timed([sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(d), str(out), str(n),
                     str(batch), str(max_length)], env)
        ends = json.loads((out / "steps.json").read_text())
        per = [(ends[i] - ends[i - 1]) for i in range(1, len(ends))]
        steady = tokens / len(ends) / statistics.median(per) if per else None
    return {**res, "tokens_per_s": tokens / res["wall_s"], "steady_tokens_per_s": steady}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--trl-worker", nargs=5, metavar=("DIR", "OUT", "N", "BATCH", "MAXLEN"))
    args = p.parse_args(argv)
    if args.trl_worker:
        d, out, n, batch, max_length = args.trl_worker
        trl_worker(d, out, int(n), int(batch), int(max_length))
        return 0
    if args.quick:
        args.shape, args.pairs, args.repeats = "tiny", 16, 1
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory(prefix="philora-dpo-bench-") as tmp:
        d = Path(tmp)
        make_model_dir(d / "model", shape)
        tokens = make_pairs(d, args.pairs, shape)
        results = {"philora": [], "trl": []}
        for r in range(args.repeats):  # alternate, the order rotating: machine noise hits both alike
            for system in (("philora", "trl") if r % 2 == 0 else ("trl", "philora")):
                res = one_run(system, d, d, args.pairs, args.batch, shape["max_length"], tokens)
                results[system].append(res)
                print(f"run {r + 1} {system}: {json.dumps({k: round(v, 1) for k, v in res.items() if v})}", flush=True)
    med = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0] if rs[0][k] is not None}
           for s, rs in results.items()}
    print(f"\nDPO, {args.shape} shape, {args.pairs} pairs ({tokens} tokens), batch {args.batch}, one epoch, "
          f"median of {args.repeats} whole-process run(s) each; load average {os.getloadavg()[0]:.1f}")
    print("| system | wall s | tokens/s (whole process) | steady tokens/s | peak RSS MiB |\n|---|---|---|---|---|")
    for s, m in med.items():
        print(f"| {s} | {m['wall_s']:.1f} | {m['tokens_per_s']:.0f} | {m.get('steady_tokens_per_s', 0):.0f} | "
              f"{m['peak_rss_mib']:.0f} |")
    a, b = med["philora"], med["trl"]
    print(f"philora / TRL: tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f} (whole process), "
          f"x{a.get('steady_tokens_per_s', 0) / max(b.get('steady_tokens_per_s', 1), 1e-9):.2f} (steady); "
          f"peak RSS x{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
