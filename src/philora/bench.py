"""``philora bench``: philora against TRL + PEFT on the same model shape, data and settings.

    philora bench                      # CPU shape (Phi-3-shaped, 59M params), 3 runs per system
    philora bench --steps 10 --repeats 1 --systems philora trl-padding-free
    philora bench --quick              # seconds: tiny shape, one short run each (a smoke test)
    philora bench --profile philora    # where the time goes: torch.profiler by op family

Hand-written because the comparison itself is the point: every run is a fresh subprocess
(``python -m philora.bench_worker``) so peak RSS never mixes between systems; systems
alternate within a repeat (and the order rotates), so machine noise hits them alike; each run
trains the same examples in the same order (same batches of ``--batch``), so losses compare.

Model: ``Phi3Config`` with random weights, saved once to a temp directory next to the tiny
model's tokenizer; no hub. Data: synthetic chat conversations (random words through the chat
template, assistant-only labels), pre-tokenized, given to both sides as ``input_ids``/``labels``.

Model FLOPs (for MFU) are the FLOPs a LoRA step *must* do per non-pad token: forward and
input-gradient matmuls of every frozen decoder linear (no weight gradients: frozen), forward,
input- and weight-gradient of the LoRA factors, causal attention within each conversation
(QK^T and AV, forward and backward), and the LM head forward plus input gradient for label
tokens only. Padding, logits of prompt tokens and recomputation are waste, not model FLOPs.
MFU = model FLOPs per token x tokens/s / matmul FLOP/s measured (2048^3, same dtype) before
each run of the same benchmark.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

SYSTEMS = {  # name: how it runs
    "philora": {"kind": "philora", "dtype": "float32"},
    "philora-bf16": {"kind": "philora", "dtype": "bfloat16"},  # a dtype change: reported apart
    "philora-checkpointing": {"kind": "philora", "dtype": "float32", "checkpointing": True},
    "trl-cookbook": {"kind": "trl", "padding_free": False},
    "trl-padding-free": {"kind": "trl", "padding_free": True},
}
BASELINES = ("trl-cookbook", "trl-padding-free")
SHAPES = {
    "cpu": dict(model=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8),
                max_length=512, lengths=(50, 400), dtype="float32"),
    "gpu": dict(model=dict(), max_length=2048, lengths=(200, 2000), dtype="bfloat16"),  # Phi-3-mini
    "tiny": dict(model=dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4),
                 max_length=128, lengths=(20, 100), dtype="float32"),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LR = 2e-4


# -- setup: model directory and data (parent process) ------------------------------------------

def make_model_dir(path: Path, shape: dict, seed: int = 0) -> None:
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
    from .tiny import resolve_model
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    cfg = Phi3Config(**shape["model"], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    Phi3ForCausalLM(cfg).to(getattr(torch, shape["dtype"])).save_pretrained(path)
    tok.save_pretrained(path)


def make_examples(tokenizer, n: int, lengths, seed: int = 0) -> List[dict]:
    """n synthetic conversations of lengths[0]..lengths[1] tokens, assistant-only labels."""
    from .data import encode_chat
    rng = random.Random(seed)
    words = sorted({w.strip(".,!?;:'\"") for w in Path(__file__).with_name("tiny.py").read_text().split()
                    if w.isalpha()})
    out = []
    while len(out) < n:
        target = rng.randint(*lengths)
        user = max(3, int(target * rng.uniform(0.2, 0.6) / 1.5))
        reply = max(3, int(target / 1.5) - user)
        msgs = [{"role": "user", "content": " ".join(rng.choices(words, k=user))},
                {"role": "assistant", "content": " ".join(rng.choices(words, k=reply))}]
        ex = encode_chat(msgs, tokenizer)
        ex = {k: v[:target] for k, v in ex.items()}
        if len(ex["input_ids"]) >= lengths[0] and any(t != -100 for t in ex["labels"][1:]):
            out.append(ex)
    return out


def model_flops(shape: dict, config, examples: List[dict], lora_params: int) -> float:
    """Model FLOPs per non-pad token (see the module docstring)."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    linear = layers * (h * (h + 2 * kv) + h * h + h * 2 * inter + inter * h)
    tokens = sum(len(e["input_ids"]) for e in examples)
    labels = sum(sum(t != -100 for t in e["labels"][1:]) for e in examples)
    ctx = sum(len(e["input_ids"]) * (len(e["input_ids"]) + 1) / 2 for e in examples)
    attn_q = config.num_attention_heads * head_dim
    total = (tokens * (4 * linear + 6 * lora_params) + 12 * attn_q * layers * ctx
             + labels * 4 * vocab * h)
    return total / tokens


def lora_param_count(config) -> int:
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h)]
    return config.num_hidden_layers * LORA["r"] * sum(i + o for i, o in shapes)


def matmul_flops(dtype: str, n: int = 2048) -> float:
    import torch
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=dev).to(getattr(torch, dtype))
    best = 0.0
    for _ in range(6):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


# -- orchestration (parent process) --------------------------------------------------------------

def run_one(system: str, d: Path, args, seed: int = 0, extra: List[str] = ()) -> dict:
    cmd = [sys.executable, "-m", "philora.bench_worker", system, "--dir", str(d), "--seed", str(seed),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--max-length", str(args.max_length), "--loss-steps", str(args.loss_steps), *extra]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {system} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def table(results: Dict[str, List[dict]], flops: float, args) -> str:
    """Medians over runs; a ratio is the median of per-repeat ratios (runs side by side in time)."""
    med = {s: {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "peak_bytes", "loss")}
           for s, runs in results.items()}
    base = [b for b in BASELINES if b in med]

    def ratio(s, b, key):
        return statistics.median(x[key] / y[key] for x, y in zip(results[s], results[b]))

    head = ["system", "non-pad tok/s"] + [f"x {b}" for b in base]
    head += ["peak CUDA alloc GiB" if args.cuda else "peak RSS GiB"] + [f"mem x {b}" for b in base[:1]]
    head += ["MFU", f"loss (last {args.loss_steps} steps)", "runs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, m in med.items():
        mfu = statistics.median(flops * r["tokens_per_s"] / r["peak_flops"] for r in results[s])
        cells = [s, f"{m['tokens_per_s']:.0f}"] + [f"{ratio(s, b, 'tokens_per_s'):.2f}" for b in base]
        cells += [f"{m['peak_bytes'] / 2**30:.2f}"] + [f"{ratio(s, b, 'peak_bytes'):.2f}" for b in base[:1]]
        cells += [f"{100 * mfu:.0f}%", f"{m['loss']:.4f}", str(len(results[s]))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(prog="philora bench", description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", default=None, choices=list(SYSTEMS))
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loss-steps", type=int, default=5, help="loss = mean of the last N steps")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny shape, 3 steps, one run each")
    ap.add_argument("--profile", default=None, choices=list(SYSTEMS), help="op-family profile of one system")
    ap.add_argument("--json", default=None, help="write all runs here")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer
    args.cuda = torch.cuda.is_available()
    if args.quick:
        args.shape, args.steps, args.warmup, args.repeats = args.shape or "tiny", 3, 1, 1
        args.loss_steps = min(args.loss_steps, 2)
        args.systems = args.systems or ["philora", "trl-padding-free"]
    shape = SHAPES[args.shape or ("gpu" if args.cuda else "cpu")]
    args.max_length = shape["max_length"]
    systems = args.systems or list(SYSTEMS)
    if args.warmup >= args.steps:
        ap.error("--warmup must be smaller than --steps")
    with tempfile.TemporaryDirectory(prefix="philora-bench-") as tmp:
        d = Path(tmp)
        make_model_dir(d, shape)
        examples = make_examples(AutoTokenizer.from_pretrained(d), args.steps * args.batch, shape["lengths"])
        (d / "data.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
        config = AutoConfig.from_pretrained(d)
        timed = examples[args.warmup * args.batch:]
        flops = model_flops(shape, config, timed, lora_param_count(config))
        print(f"philora bench: shape {args.shape or ('gpu' if args.cuda else 'cpu')} "
              f"({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}"
              f"), batch {args.batch}, max_length "
              f"{args.max_length}, {args.steps} steps ({args.warmup} untimed), LoRA r=16 alpha=32 "
              f"dropout 0.05 all-linear; {sum(len(e['input_ids']) for e in timed)} timed tokens; "
              f"model FLOPs/token {flops / 1e6:.1f} M", flush=True)
        if args.profile:
            prof = run_one(args.profile, d, args, extra=["--profile", args.profile])["profile"]
            total = sum(f["s"] for f in prof.values())
            print(f"\nprofile of {args.profile} ({args.steps - args.warmup} steps, self time by op family):")
            for fam, f in prof.items():
                ops = ", ".join(f"{k} {100 * t / total:.0f}%" for k, t in f["ops"].items())
                print(f"  {fam:22s} {f['s']:7.2f} s  {100 * f['s'] / total:5.1f}%   ({ops})")
            return 0
        results: Dict[str, List[dict]] = {s: [] for s in systems}
        for rep in range(args.repeats):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for s in order:
                dtype = SYSTEMS[s].get("dtype", "bfloat16" if args.cuda else "float32")
                peak_flops = matmul_flops(dtype)
                before = load_avg()
                r = run_one(s, d, args, seed=rep)  # repeat r: seed r for every system
                r.update(peak_flops=peak_flops, load=f"{before} -> {load_avg()}")
                results[s].append(r)
                print(f"  run {rep + 1}/{args.repeats} {s:18s} {r['tokens_per_s']:7.0f} tok/s  "
                      f"{r['peak_bytes'] / 2**30:5.2f} GiB  loss {r['loss']:.4f}  "
                      f"matmul {peak_flops / 1e9:.0f} GFLOP/s  load {r['load']}", flush=True)
        print()
        print(table(results, flops, args))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                   "flops_per_token": flops, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
