"""QLoRA vs a 16-bit base: LoRA training speed and peak memory on a Phi-3-shaped model.

    python bench/qlora.py [--steps 6] [--warmup 2] [--repeats 3] [--batch 2] [--seq 256]
                          [--variants fp32,bf16,nf4,nf4-bf16]

Builds a Phi-3-shaped model with random weights in a temporary directory (hidden 512,
intermediate 1376, 8 layers, 8 heads, vocabulary 32064; the tiny model's tokenizer), then runs
each variant in a fresh subprocess so peak memory never mixes between them: load the base,
LoRA r=16 on every linear layer, AdamW, ``--steps`` timed optimizer steps of ``--batch`` x
``--seq`` tokens after ``--warmup`` untimed ones (philora's own loss, no data pipeline).
Speed is the fastest step of ``--repeats`` runs taken in alternating order: on a shared machine
other jobs only ever slow a step down, so the fastest one is the best estimate of the variant's
own speed (the median of each run is printed too).

Variants: ``fp32`` and ``bf16`` bases; ``nf4`` (4-bit base, fp32 compute) and ``nf4-bf16``
(4-bit base, bf16 compute and bf16 embeddings/head). Memory on CPU: the peak RSS of the
training steps (the high-water mark is reset after loading) above the RSS before loading (with
torch, transformers and bitsandbytes imported), so the interpreter and libraries do not dilute
the ratio; on a GPU, peak CUDA allocation. ``weights``
is the bytes of the model's parameters and buffers as loaded (what quantization shrinks).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (dtype, quantization, compute_dtype)
    "fp32": ("float32", None, "float32"),
    "bf16": ("bfloat16", None, "bfloat16"),
    "nf4": ("float32", "nf4", "float32"),
    "nf4-bf16": ("bfloat16", "nf4", "bfloat16"),
}


def make_model_dir(path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from philora.tiny import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    config = Phi3Config(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                        original_max_position_embeddings=4096, tie_word_embeddings=False,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


def rss(field: str = "VmRSS") -> int:
    """Resident memory in bytes: now (VmRSS) or the high-water mark (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the VmHWM high-water mark
        f.write("5")


def worker(args) -> None:
    import torch

    from philora.config import ModelConfig
    from philora.inject import inject_lora
    from philora.loading import load_model_and_tokenizer
    from philora.loss import CausalLMLoss

    import transformers  # noqa: F401  (libraries in memory before the baseline is read)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    dtype, quant, compute = VARIANTS[args.worker]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    before = rss()
    cfg = ModelConfig(name_or_path=args.dir, dtype=dtype, quantization=quant, compute_dtype=compute,
                      gradient_checkpointing=args.gradient_checkpointing)
    model, _, _ = load_model_and_tokenizer(cfg, device, training=True)
    if quant:
        from philora.quant import prepare_quantized
        prepare_quantized(model)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    inject_lora(model, 16, 32, 0.0, "all-linear")
    loss_fn = CausalLMLoss(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and dtype == "bfloat16")
    losses, times = [], []
    load_peak = rss("VmHWM")
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast:
            loss_sum, n = loss_fn(batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((loss_sum / n).item())  # .item() waits for the GPU
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    print(json.dumps({"variant": args.worker, "tokens_per_s": tokens / min(times),
                      "median_tokens_per_s": tokens / statistics.median(times),
                      "peak": torch.cuda.max_memory_allocated() if cuda else rss("VmHWM") - before,
                      "load_peak": None if cuda else load_peak - before, "weights": weights,
                      "loss": losses[-1], "cuda": cuda}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", default="fp32,bf16,nf4,nf4-bf16")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="philora-qlora-bench-"))
    try:
        make_model_dir(tmp / "model")
        runs = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                cmd = [sys.executable, __file__, "--worker", name, "--dir", str(tmp / "model"),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                       "--seq", str(args.seq)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=False)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode != 0 or not lines:
                    print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                runs[name].append(json.loads(lines[-1]))
                r = runs[name][-1]
                print(f"{name}: {r['tokens_per_s']:.0f} tokens/s (median step {r['median_tokens_per_s']:.0f})",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = {}
    for name, rs in runs.items():
        if rs:
            results[name] = dict(rs[0], tokens_per_s=max(r["tokens_per_s"] for r in rs),
                                 **{k: statistics.median(r[k] for r in rs)
                                    for k in ("peak", "load_peak") if rs[0][k] is not None})
    print(table(results, args))
    return 0


def table(results: dict, args) -> str:
    ref = results.get("bf16") or next(iter(results.values()), None)
    if ref is None:
        return "no results"
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    mem = "training peak CUDA alloc GiB" if ref["cuda"] else "training peak RSS over pre-load GiB"
    rows = [f"Phi-3 shape (hidden 512, 8 layers, vocab 32064), LoRA r=16 all-linear, batch {args.batch} x "
            f"{args.seq} tokens, fastest of {args.steps} steps x {args.repeats} runs (memory: median run); "
            f"ratios vs {ref['variant']}", "",
            f"| base | tokens/s | x | {mem} | x | load peak GiB | weights MiB | x | loss |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        load = "-" if r["load_peak"] is None else gib(r["load_peak"])
        rows.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                    f"{gib(r['peak'])} | {r['peak'] / ref['peak']:.2f} | {load} | "
                    f"{r['weights'] / 2**20:.0f} | {r['weights'] / ref['weights']:.2f} | {r['loss']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
