"""QLoRA vs a 16-bit base: ``philora train``'s LoRA speed and peak memory on a Phi-3-shaped model.

    python bench/qlora.py [--steps 6] [--warmup 2] [--repeats 3] [--batch 2] [--seq 256]
                          [--variants fp32,bf16,nf4,nf4-bf16] [--shape cpu] [--gradient-checkpointing]

Builds a Phi-3-shaped model with random weights in a temporary directory (``--shape cpu``:
hidden 512, intermediate 1376, 8 layers, 8 heads, vocabulary 32064; the tiny model's
tokenizer) and synthetic chat conversations of 0.9 x ``--seq`` to ``--seq`` tokens from the
benchmark text (bench/run.py), then runs each variant in a fresh subprocess (``bench/worker.py``)
so peak memory never mixes between them. Each run is ``philora.run.train.train`` itself (LoRA r=16,
alpha 32, no dropout, all linear layers, lr 1e-4 constant, batch ``--batch`` conversations,
one per row) for ``--warmup`` untimed then ``--steps`` timed optimizer steps; speed and loss
are the run's own ``metrics.jsonl`` records. Speed is the fastest timed step of ``--repeats``
runs taken in alternating order: on a shared machine other jobs only ever slow a step down,
so the fastest one is the best estimate of the variant's own speed (the median step is printed
too).

Variants (``model.dtype`` / ``model.quantization`` / ``model.compute_dtype``): ``fp32`` and
``bf16`` bases; ``nf4`` (4-bit base, fp32 compute) and ``nf4-bf16`` (4-bit base, bf16 compute
and bf16 embeddings/head). Memory on CPU: the peak RSS of training (the high-water mark is
reset at the first forward pass, when loading is over) above the RSS before ``train`` was called
(with torch, transformers, bitsandbytes and philora imported), so the interpreter and libraries
do not dilute the ratio; ``load peak`` is the same for the loading before it (tokenizing the data,
loading and quantizing the base, LoRA). On a GPU: peak CUDA allocation. ``weights`` is the bytes
of the model's frozen parameters and buffers as loaded (what quantization shrinks).
"""

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = {  # name: model config
    "fp32": dict(dtype="float32", quantization=None, compute_dtype="float32"),
    "bf16": dict(dtype="bfloat16", quantization=None, compute_dtype="bfloat16"),
    "nf4": dict(dtype="float32", quantization="nf4", compute_dtype="float32"),
    "nf4-bf16": dict(dtype="bfloat16", quantization="nf4", compute_dtype="bfloat16"),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
LR = 1e-4


def bench_run():
    """bench/run.py as a module (model directory, benchmark conversations, the worker runner)."""
    spec = importlib.util.spec_from_file_location("philora_bench_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def summarize(name: str, rs: list, warmup: int) -> dict:
    """Fastest and median timed step over runs; memory of the median run, above the baseline."""
    timed = [s["tokens_per_s"] for r in rs for s in r["steps"] if s["step"] > warmup]
    cuda = rs[0]["cuda"]

    def above(r, key):
        return r[key] if cuda else r[key] - r["rss_baseline"]

    train_key = "train_peak_bytes" if rs[0]["train_peak_bytes"] is not None else "peak_bytes"
    return {"variant": name, "cuda": cuda, "tokens_per_s": max(timed),
            "median_tokens_per_s": statistics.median(timed),
            "peak": statistics.median(above(r, train_key) for r in rs),
            "peak_reset": train_key == "train_peak_bytes",
            "load_peak": statistics.median(above(r, "load_peak_bytes") for r in rs),
            "weights": rs[0]["weights"], "loss": statistics.median(r["losses"][-1] for r in rs)}


def table(results: dict, args) -> str:
    ref = results.get("bf16") or next(iter(results.values()), None)
    if ref is None:
        return "no results"
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    mem = "training peak CUDA alloc GiB" if ref["cuda"] else "training peak RSS over pre-load GiB"
    if not ref["peak_reset"]:
        mem += " (loading included: the high-water mark could not be reset)"
    load = "load peak CUDA alloc GiB" if ref["cuda"] else "load peak RSS over pre-load GiB"
    rows = [f"philora train, Phi-3 shape {args.shape}, LoRA r=16 all-linear, batch {args.batch} "
            f"conversations of <= {args.seq} tokens, fastest of {args.steps} steps x {args.repeats} "
            f"runs (memory: median run); ratios vs {ref['variant']}", "",
            f"| base | tokens/s | x | median step tokens/s | {mem} | x | {load} | weights MiB | x | loss |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                    f"{r['median_tokens_per_s']:.0f} | {gib(r['peak'])} | {r['peak'] / ref['peak']:.2f} | "
                    f"{gib(r['load_peak'])} | {r['weights'] / 2**20:.0f} | {r['weights'] / ref['weights']:.2f} | "
                    f"{r['loss']:.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="QLoRA vs a 16-bit base: philora train's LoRA speed and peak "
                                             "memory on a Phi-3-shaped model")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256, help="tokens per conversation (at most)")
    ap.add_argument("--variants", default="fp32,bf16,nf4,nf4-bf16")
    ap.add_argument("--shape", default="cpu", help="model shape from bench/run.py (cpu, tiny, gpu)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    run = bench_run()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    if args.shape not in run.SHAPES:
        ap.error(f"--shape: choose from {sorted(run.SHAPES)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    from transformers import AutoTokenizer
    tmp = Path(tempfile.mkdtemp(prefix="philora-qlora-bench-"))
    runs = {name: [] for name in names}
    try:
        run.make_model_dir(tmp / "model", run.SHAPES[args.shape])
        total = args.warmup + args.steps
        convs = run.make_conversations(AutoTokenizer.from_pretrained(tmp / "model"), total * args.batch,
                                       (max(2, int(0.9 * args.seq)), args.seq))
        run.write_data(tmp, convs)
        for rep in range(args.repeats):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                spec = {"kind": "philora", **VARIANTS[name], "checkpointing": args.gradient_checkpointing}
                job = {"system": name, "spec": spec, "dir": str(tmp), "seed": 0, "steps": total,
                       "warmup": args.warmup, "batch": args.batch, "max_length": args.seq, "lr": LR,
                       "lora": LORA, "loss_steps": 1, "profile": False}
                try:
                    r = run.run_worker(job, tmp, f"{name}-{rep}")
                except RuntimeError as e:
                    print(f"{name}: {e}", file=sys.stderr)
                    continue
                runs[name].append(r)
                timed = [s["tokens_per_s"] for s in r["steps"] if s["step"] > args.warmup]
                print(f"{name}: {max(timed):.0f} tokens/s (median step {statistics.median(timed):.0f})",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {name: summarize(name, rs, args.warmup) for name, rs in runs.items() if rs}
    print(table(results, args))
    return 0 if len(results) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
