"""QLoRA vs a 16-bit base: LoRA training speed and peak memory on a Phi-3-shaped model.

    python bench/qlora.py [--steps 4] [--warmup 1] [--batch 2] [--seq 256] [--variants fp32,bf16,nf4,nf4-bf16]

Builds a Phi-3-shaped model with random weights in a temporary directory (hidden 512,
intermediate 1376, 8 layers, 8 heads, vocabulary 32064; the tiny model's tokenizer), then runs
each variant in a fresh subprocess so peak memory never mixes between them: load the base,
LoRA r=16 on every linear layer, AdamW, ``--steps`` timed optimizer steps of ``--batch`` x
``--seq`` tokens after ``--warmup`` untimed ones (philora's own loss, no data pipeline).

Variants: ``fp32`` and ``bf16`` bases; ``nf4`` (4-bit base, fp32 compute) and ``nf4-bf16``
(4-bit base, bf16 compute and bf16 embeddings/head). Memory: peak RSS of the process and the
part above its RSS before loading, or peak CUDA allocation on a GPU; ``weights`` is the bytes
of the model's parameters and buffers as loaded (what quantization shrinks).
"""

import argparse
import json
import os
import resource
import shutil
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


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> None:
    import torch

    from philora.config import ModelConfig
    from philora.inject import inject_lora
    from philora.loading import load_model_and_tokenizer
    from philora.loss import CausalLMLoss

    dtype, quant, compute = VARIANTS[args.worker]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    before = rss_now()
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
    losses = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with autocast:
            loss_sum, n = loss_fn(batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((loss_sum / n).item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"variant": args.worker, "tokens_per_s": args.steps * args.batch * args.seq / seconds,
                      "peak": torch.cuda.max_memory_allocated() if cuda else peak,
                      "over_base": None if cuda else peak - before, "weights": weights,
                      "loss": losses[-1], "cuda": cuda}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
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
        results = {}
        for name in names:
            cmd = [sys.executable, __file__, "--worker", name, "--dir", str(tmp / "model"),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--seq", str(args.seq)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            results[name] = json.loads(lines[-1])
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args))
    return 0


def table(results: dict, args) -> str:
    ref = results.get("bf16") or next(iter(results.values()), None)
    if ref is None:
        return "no results"
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    mem = "peak CUDA alloc GiB" if ref["cuda"] else "peak RSS GiB"
    rows = [f"Phi-3 shape (hidden 512, 8 layers, vocab 32064), LoRA r=16 all-linear, batch {args.batch} x "
            f"{args.seq} tokens, {args.steps} timed steps; ratios vs {ref['variant']}", "",
            f"| base | tokens/s | x | {mem} | x | above pre-load RSS GiB | x | weights MiB | x | loss |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        over = "-" if r["over_base"] is None else gib(r["over_base"])
        over_x = "-" if r["over_base"] is None else f"{r['over_base'] / ref['over_base']:.2f}"
        rows.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                    f"{gib(r['peak'])} | {r['peak'] / ref['peak']:.2f} | {over} | {over_x} | "
                    f"{r['weights'] / 2**20:.0f} | {r['weights'] / ref['weights']:.2f} | {r['loss']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
