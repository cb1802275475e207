"""Same-run A/B of two commits: ``philora train`` of each on the same model, data and settings.

    python bench/ab.py --base HEAD~5                 # this checkout against HEAD~5, 3 alternating runs each
    python bench/ab.py --base v1 --head v2 --repeats 5 --steps 12

Each side is the ``philora train`` command line of its own checkout (a ``git worktree`` of the revision,
on ``PYTHONPATH``), run as a whole process, alternating A, B, B, A, ... so that a machine that gets busier
or quieter weighs on both alike. Both re-execute themselves with the same allocator (TCMalloc where the
machine has it: ``philora train``'s own choice). The model, tokenizer and conversations are
``bench/run.py``'s CPU shape (a Phi-3-shaped 59M model with random weights, LoRA r=16 on all linear
layers, dropout 0.05, batch 4, max_length 512, constant LR); tokens/s is the median over the steps after
``--warmup`` from each run's ``metrics.jsonl``; the table gives medians over runs and the B/A ratio.
The final loss of both sides must agree (same computation), which the table shows too.
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from run import SHAPES, make_conversations, make_model_dir, write_data  # noqa: E402


def config(d: Path, out: Path, steps: int, batch: int, max_length: int) -> dict:
    """bench/worker.py's philora config, as YAML for the command line."""
    return {
        "model": {"name_or_path": str(d / "model"), "dtype": "float32", "attn_implementation": "philora_sdpa"},
        "data": {"train": str(d / "train.jsonl"), "eval_fraction": 0.0, "format": "messages",
                 "max_length": max_length, "packing": True, "shuffle": False},
        "training_config": {"output_dir": str(out), "learning_rate": 2e-4, "max_steps": steps,
                            "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1,
                            "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                            "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0, "logging_steps": 1,
                            "eval_steps": 0, "save_steps": 0, "report_samples": 0, "progress_bar": False},
        "peft_config": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"},
    }


def checkout(rev: str, where: Path) -> Path:
    """The ``src`` directory of ``rev`` (a worktree), or of this checkout for ``rev`` = 'WORKTREE'."""
    if rev == "WORKTREE":
        return ROOT / "src"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev],
                   check=True, capture_output=True)
    return where / "src"


def run_once(src: Path, cfg_path: Path, out: Path, warmup: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    start = time.time()
    p = subprocess.run([sys.executable, "-m", "philora", "train", str(cfg_path), "--overwrite"],
                       capture_output=True, text=True, env=env, cwd=str(src.parent))
    wall = time.time() - start
    if p.returncode != 0:
        raise SystemExit(f"philora train ({src}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[warmup:]),
            "wall_s": wall, "loss": steps[-1]["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="revision A (e.g. HEAD~3)")
    ap.add_argument("--head", default="WORKTREE", help="revision B (default: this checkout as it is)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    shape = SHAPES["cpu"]
    commits = {s: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", r if r != "WORKTREE" else "HEAD"],
                                 capture_output=True, text=True).stdout.strip() + ("+" if r == "WORKTREE" else "")
               for s, r in (("A", args.base), ("B", args.head))}
    with tempfile.TemporaryDirectory(prefix="philora-ab-") as tmp:
        d = Path(tmp)
        from transformers import AutoTokenizer
        make_model_dir(d / "model", shape)
        write_data(d, make_conversations(AutoTokenizer.from_pretrained(d / "model"), args.steps * 4, shape["lengths"]))
        srcs = {"A": checkout(args.base, d / "wt-a"), "B": checkout(args.head, d / "wt-b")}
        results = {"A": [], "B": []}
        try:
            for rep in range(args.repeats):
                for side in ("AB" if rep % 2 == 0 else "BA"):
                    out = d / f"run-{side}"
                    cfg_path = d / f"{side}.yaml"
                    cfg_path.write_text(yaml.safe_dump(config(d, out, args.steps, 4, shape["max_length"])))
                    r = run_once(srcs[side], cfg_path, out, args.warmup)
                    results[side].append(r)
                    print(f"run {rep + 1} {side} ({commits[side]}): {r['tokens_per_s']:.0f} tokens/s, "
                          f"{r['wall_s']:.1f} s whole process, final loss {r['loss']}", flush=True)
        finally:
            for wt in ("wt-a", "wt-b"):
                if (d / wt).exists():
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(d / wt)],
                                   capture_output=True)
    med = {s: {k: statistics.median(r[k] for r in results[s]) for k in ("tokens_per_s", "wall_s")} for s in "AB"}
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| side | commit | tokens/s (median) | whole process s (median) | final loss |")
    print("|---|---|---|---|---|")
    for s in "AB":
        print(f"| {s} | {commits[s]} | {med[s]['tokens_per_s']:.0f} | {med[s]['wall_s']:.1f} | {results[s][-1]['loss']} |")
    print(f"\nB/A tokens/s: {med['B']['tokens_per_s'] / med['A']['tokens_per_s']:.3f}x; "
          f"B/A whole process time: {med['B']['wall_s'] / med['A']['wall_s']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
