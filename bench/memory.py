"""The longest conversation that fits in a memory budget: philora vs TRL + PEFT.

    python bench/memory.py                         # CPU shape, 3 GiB of peak RSS, philora and TRL
    python bench/memory.py --budget-gib 2 --systems philora philora-checkpointing
    python bench/memory.py --shape tiny --budget-gib 1 --max-tokens 4096   # seconds-long smoke run

Each probe is one run of ``bench/worker.py`` (a fresh process, as ``bench/run.py`` measures):
two training steps on one conversation of about L tokens (batch 1, max_length L, the
benchmark's LoRA settings), and their peak memory: the process's peak RSS on CPU (imports, weights
and training: what the machine must hold), peak CUDA allocation on a GPU. The longest L whose
peak stays within the budget is found by doubling from ``--min-tokens`` and then bisecting
(``--steps-of`` tokens apart); a run that fails (out of memory) does not fit.

Written by hand: no library measures this. ``longest`` is also what ``bench/gpu_check.py``
uses on the GPU, in-process.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (bench/run.py: model directory, conversations, workers)


def longest(fits: Callable[[int], bool], lo: int, hi: int, step: int) -> Tuple[int, List[Tuple[int, bool]]]:
    """The largest L in [lo, hi] (a multiple of ``step`` above lo) with ``fits(L)``, assuming
    fits is monotone; 0 when even ``lo`` does not fit. Returns (L, probes in order)."""
    probes: List[Tuple[int, bool]] = []

    def probe(n: int) -> bool:
        ok = fits(n)
        probes.append((n, ok))
        return ok

    if not probe(lo):
        return 0, probes
    good, bad = lo, None
    while bad is None and good < hi:  # double until it does not fit (or hi)
        n = min(hi, good * 2)
        if probe(n):
            good = n
        else:
            bad = n
    while bad is not None and bad - good > step:  # bisect
        mid = (good + bad) // 2 // step * step
        if mid <= good:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good, probes


def conversation(tokenizer, n: int, seed: int) -> dict:
    """One conversation of n - n/32 .. n tokens (chat template included)."""
    return bench.make_conversations(tokenizer, 1, (max(8, n - n // 32), n), seed=seed)[0]


def peak_of(system: str, n: int, d: Path, tokenizer, seed: int = 0) -> Optional[int]:
    """Peak bytes of one step on one conversation of ~n tokens (None: the run failed)."""
    conv = conversation(tokenizer, n, seed)
    probe_dir = d / f"probe-{system}-{n}"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "model").symlink_to(d / "model")
    bench.write_data(probe_dir, [conv, conv])  # two steps: TRL's timing needs an untimed first
    job = {"system": system, "spec": bench.SYSTEMS[system], "dir": str(probe_dir), "seed": seed,
           "steps": 2, "warmup": 1, "batch": 1, "max_length": len(conv["input_ids"]), "lr": bench.LR,
           "lora": bench.LORA, "loss_steps": 1, "profile": False}
    try:
        return bench.run_worker(job, probe_dir, f"{system}-{n}")["peak_bytes"]
    except RuntimeError:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="the longest conversation that fits in a memory budget, "
                                 "philora vs TRL + PEFT (one fresh process per probe)")
    ap.add_argument("--systems", nargs="+", default=["philora", "trl-padding-free"], choices=list(bench.SYSTEMS))
    ap.add_argument("--shape", choices=list(bench.SHAPES), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--budget-gib", type=float, default=3.0, help="peak RSS (CPU) or CUDA memory (GPU)")
    ap.add_argument("--min-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--steps-of", type=int, default=256, help="resolution of the answer, in tokens")
    ap.add_argument("--json", default=None, help="write the probes here")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    import torch
    from transformers import AutoTokenizer
    shape_name = args.shape or ("gpu" if torch.cuda.is_available() else "cpu")
    budget = int(args.budget_gib * 2 ** 30)
    kind = "peak CUDA allocation" if torch.cuda.is_available() else "peak RSS"
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="philora-memory-") as tmp:
        d = Path(tmp)
        bench.make_model_dir(d / "model", bench.SHAPES[shape_name])
        tok = AutoTokenizer.from_pretrained(d / "model")
        print(f"philora bench memory: shape {shape_name}, budget {args.budget_gib:g} GiB of {kind}, "
              f"one conversation per step, LoRA r={bench.LORA['r']} all-linear", flush=True)
        for s in args.systems:
            peaks: Dict[int, Optional[int]] = {}

            def fits(n: int) -> bool:
                peaks[n] = peak_of(s, n, d, tok)
                ok = peaks[n] is not None and peaks[n] <= budget
                shown = "failed" if peaks[n] is None else f"{peaks[n] / 2**30:.2f} GiB"
                print(f"  {s:22s} {n:6d} tokens: {shown} {'fits' if ok else 'does not fit'}", flush=True)
                return ok

            n, probes = longest(fits, args.min_tokens, args.max_tokens, args.steps_of)
            results[s] = {"longest": n, "probes": [(m, ok, peaks[m]) for m, ok in probes]}
    print()
    print(table(results, args.budget_gib, kind))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    return 0


def table(results: Dict[str, dict], budget_gib: float, kind: str) -> str:
    first = next(iter(results))
    rows = [f"| system | longest conversation in {budget_gib:g} GiB of {kind} | x {first} |", "|---|---|---|"]
    for s, r in results.items():
        base = results[first]["longest"]
        ratio = f"{r['longest'] / base:.2f}" if base else "-"
        rows.append(f"| {s} | {r['longest']} tokens | {ratio} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
