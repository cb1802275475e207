"""Issue 15's GPU check, on one CUDA GPU in under 8 minutes (``bash bench/gpu.sh`` runs it).

    bash bench/gpu.sh                       # on the GPU machine: wheels from bench/wheels, then this
    python bench/gpu_check.py --dry-run     # CPU, tiny shape: the plumbing (tests/test_gpu_script.py)

Three phases; each writes ``results.json`` and ``results.md`` in ``--out`` as it ends, and a
phase that would start after ``--budget-s`` seconds is skipped (and said so), so a killed run
still leaves what it measured; no probe of phase 3 starts after ``--stop-s``:

1. ``smoke``: CUDA correctness. The fused LoRA path (fused.py) against the plain layers
   (float32 with TF32 off, dropout 0.1: on CUDA both draw ``native_dropout``'s mask; and a bf16
   model under bf16 autocast); a packed row of several conversations (philora_sdpa: SDPA per
   conversation) against each conversation alone, loss and LoRA gradients, in float32 and bf16
   autocast; torch's variable-length attention (``torch.nn.attention.varlen``, when there)
   against SDPA per conversation. Relative errors go in the results; a failure is reported,
   not raised, so the other phases still run.
2. ``speed``: Phi-3-mini's shape (3.8B, random bf16 weights, max_length 2048, packed, batch 4,
   conversations of 200-2000 tokens), the systems of ``bench/run.py`` through its own workers
   (philora: ``philora.run.train.train``; TRL + PEFT: ``SFTTrainer``, SDPA, cookbook and
   padding-free): non-pad tokens/s, peak CUDA memory, MFU against the measured bf16 matmul rate.
3. ``longest``: the longest single conversation one training step fits in the GPU's memory,
   philora (fused LoRA, philora_sdpa) vs TRL + PEFT (padding-free, SDPA), in-process: a CUDA
   out-of-memory error means it does not fit (``bench/memory.longest``: doubling, then bisection).
"""

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import memory as membench  # noqa: E402  (bench/memory.py: longest())
import run as bench  # noqa: E402  (bench/run.py: shapes, data, workers, table)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

LONGEST_SYSTEMS = ("philora", "trl-padding-free")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# -- 1. smoke -------------------------------------------------------------------------------------

def smoke_fused(device: torch.device) -> Dict[str, float]:
    """Worst relative error of output and gradients (x, A, B): fused vs plain LoRA layer."""
    from philora.model import fused
    from philora import lora
    from philora.model.dropout import Dropout
    out = {}
    cases = [("fp32_dropout0.1", torch.float32, 0.1, False), ("bf16_autocast", torch.bfloat16, 0.0, True)]
    for name, dtype, p, amp in cases:
        torch.manual_seed(0)
        plain = lora.Linear(512, 768, r=16, lora_alpha=32).to(device)
        nn.init.normal_(plain.lora_B, std=0.05)
        fast = fused.Linear(512, 768, r=16, lora_alpha=32).to(device)
        fast.load_state_dict(plain.state_dict())
        for m in (plain, fast):
            m.weight.data = m.weight.data.to(dtype)
            m.bias.data = m.bias.data.to(dtype)
            m.lora_dropout = Dropout(p) if p else nn.Identity()
        x = torch.randn(4, 300, 512, device=device).to(dtype)
        g = torch.randn(4, 300, 768, device=device).to(dtype)
        res = []
        for m in (plain, fast):
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(5)
            ctx = torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()
            with ctx:
                y = m(xi)
            y.backward(g)
            res.append([y, xi.grad, m.lora_A.grad, m.lora_B.grad])
        assert type(res[1][0].grad_fn).__name__ == "_LoRALinearBackward", "the fused path did not run"
        out[name] = max(rel_err(b, a) for a, b in zip(*res))
    return out


def tiny_lora_model(device: torch.device, dtype: torch.dtype):
    from transformers import Phi3Config, Phi3ForCausalLM

    from philora.model import attention
    from philora.core.config import PeftConfig
    from philora.model.inject import inject_lora
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=False,
                     attn_implementation=attention.register())
    model = Phi3ForCausalLM(cfg).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    inject_lora(model, PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0))
    for n, prm in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(prm, std=0.05)
    return model.train()


def smoke_packing(device: torch.device) -> Dict[str, float]:
    """Worst relative error of the loss and LoRA gradients: one packed row vs each conversation alone."""
    from philora.data.batching import collate
    from philora.model.loss import CausalLMLoss
    out = {}
    g = torch.Generator().manual_seed(1)
    convs = []
    for n in (70, 30, 50, 20):
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        convs.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    for name, dtype, amp in (("fp32", torch.float32, False), ("bf16_autocast", torch.bfloat16, True)):
        model = tiny_lora_model(device, dtype)
        loss_fn = CausalLMLoss(model)
        ctx = (lambda: torch.autocast(device.type, dtype=dtype)) if amp else contextlib.nullcontext

        def run(batches):
            total = 0.0
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                with ctx():
                    loss, _ = loss_fn(b)
                loss.float().backward()
                total = total + loss.detach().double()
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            model.zero_grad(set_to_none=True)
            return total, grads

        packed, gp = run([collate(convs, 0, True, 10 ** 9)])
        alone, ga = run([collate([c], 0, True, 10 ** 9) for c in convs])
        out[name] = max([rel_err(packed, alone)] + [rel_err(a, b) for a, b in zip(gp, ga)])
    return out


def smoke_varlen(device: torch.device) -> Dict[str, object]:
    """torch.nn.attention.varlen (causal, one row of conversations) vs SDPA per conversation."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return {"skipped": "torch.nn.attention.varlen is not in this torch"}
    if device.type != "cuda":
        return {"skipped": "varlen attention runs on CUDA only"}
    torch.manual_seed(2)
    lengths = [700, 300, 1000, 48]
    T, H, D = sum(lengths), 32, 96
    q, k, v = (torch.randn(T, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), device=device, dtype=torch.int32)
    causal = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
              else {"is_causal": True})
    got = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), **causal)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], is_causal=True)[0]
        .transpose(0, 1) for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths))])
    return {"bf16": rel_err(got, ref)}


SMOKE_LIMITS = {"fused": {"fp32_dropout0.1": 1e-5, "bf16_autocast": 3e-2},
                "packing": {"fp32": 1e-4, "bf16_autocast": 5e-2}, "varlen": {"bf16": 2e-2}}


def smoke(device: torch.device) -> Dict[str, dict]:
    if device.type == "cuda":  # float32 means float32: no TF32 in the reference comparisons
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    out = {}
    for name, fn in (("fused", smoke_fused), ("packing", smoke_packing), ("varlen", smoke_varlen)):
        try:
            r = fn(device)
            limits = SMOKE_LIMITS[name]
            r["ok"] = all(r[k] <= limits[k] for k in limits if k in r)
        except Exception as e:  # reported in the results: the other phases still run
            r = {"ok": False, "error": "".join(traceback.format_exception_only(type(e), e)).strip()}
        out[name] = r
        print(f"  smoke {name}: {r}", flush=True)
    return out


# -- 2. speed -------------------------------------------------------------------------------------

def make_model_dir(path: Path, shape: dict, device: torch.device) -> None:
    """bench/run.py's model directory, built on ``device`` (a 3.8B model in seconds on a GPU)."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from philora.model.tiny import resolve_model
    tok = AutoTokenizer.from_pretrained(resolve_model("tiny"))
    cfg = Phi3Config(**shape["model"], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = Phi3ForCausalLM(cfg).to(getattr(torch, shape["dtype"]))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model


def speed(args, d: Path, shape: dict, systems: List[str]) -> dict:
    from transformers import AutoConfig, AutoTokenizer
    convs = bench.make_conversations(AutoTokenizer.from_pretrained(d / "model"), args.steps * args.batch,
                                     shape["lengths"])
    bench.write_data(d, convs)
    config = AutoConfig.from_pretrained(d / "model")
    timed = convs[args.warmup * args.batch:]
    flops = bench.model_flops(shape, config, timed, bench.lora_param_count(config))
    results = {}
    for s in systems:
        peak = bench.matmul_flops(bench.run_dtype(s, args.cuda))
        try:
            r = bench.run_worker(bench.job_for(s, d, args, seed=0), d, s)
        except RuntimeError as e:
            print(f"  speed {s}: failed: {str(e)[-500:]}", flush=True)
            continue
        r["peak_flops"] = peak
        results[s] = [r]
        print(f"  speed {s:18s} {r['tokens_per_s']:8.0f} tok/s  peak {r['peak_bytes'] / 2**30:6.2f} GiB  "
              f"MFU {100 * flops * r['tokens_per_s'] / peak:4.1f}%  loss {r['loss']:.4f}", flush=True)
    return {"table": bench.table(results, flops, args) if results else "", "flops_per_token": flops,
            "timed_tokens": sum(len(e["input_ids"]) for e in timed),
            "runs": {s: {k: r[0][k] for k in ("tokens_per_s", "peak_bytes", "loss", "peak_flops")}
                     for s, r in results.items()}}


# -- 3. longest -----------------------------------------------------------------------------------

def peak_meter(device: torch.device) -> Callable[[Callable[[], None]], Optional[int]]:
    """measure(step) -> peak bytes of step(), None on out-of-memory (CUDA: allocator peak;
    CPU, for --dry-run only: the process's peak RSS)."""
    def measure(step):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        try:
            step()
        except torch.OutOfMemoryError:
            return None
        finally:
            gc.collect()
        if device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(device))
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return measure


def one_conversation(n: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(3, vocab, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]}  # half of it answer


def philora_stepper(model_dir: Path, device: torch.device, vocab: int):
    from philora.data.batching import collate
    from philora.core.config import ModelConfig, PeftConfig
    from philora.model.inject import inject_lora
    from philora.model.loading import load_model_and_tokenizer
    from philora.model.loss import CausalLMLoss
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model, _, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), dtype=dtype,
                                                       attn_implementation="philora_sdpa"), device)
    inject_lora(model, PeftConfig(target_modules="all-linear", **bench.LORA))
    loss_fn = CausalLMLoss(model).train()
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    def step(n: int) -> None:
        b = {k: v.to(device) for k, v in collate([one_conversation(n, vocab)], 0, True, n).items()}
        with amp():
            loss, count = loss_fn(b)
        (loss.float() / count).backward()
        model.zero_grad(set_to_none=True)
    return step, model


def trl_stepper(model_dir: Path, device: torch.device, vocab: int, work: Path):
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    cuda = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa", device_map={"": str(device)})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", **bench.LORA))

    def step(n: int) -> None:
        cfg = SFTConfig(output_dir=str(work), per_device_train_batch_size=1, max_length=None,
                        padding_free=True, bf16=cuda, learning_rate=bench.LR, max_steps=1,
                        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                        use_cpu=not cuda, dataloader_num_workers=0)
        SFTTrainer(model=model, args=cfg, processing_class=tok,
                   train_dataset=datasets.Dataset.from_list([one_conversation(n, vocab)])).train()
        model.zero_grad(set_to_none=True)
    return step, model


def longest_phase(args, d: Path, device: torch.device, systems: List[str], budget: int,
                  stop_at: float = math.inf) -> dict:
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(d / "model").vocab_size
    measure = peak_meter(device)
    out = {}
    for s in systems:
        if s not in ("philora", "trl-padding-free"):
            continue
        try:
            step, model = (philora_stepper(d / "model", device, vocab) if s == "philora"
                           else trl_stepper(d / "model", device, vocab, d / "trl-longest"))
        except ImportError as e:
            out[s] = {"skipped": str(e)}
            continue
        peaks: Dict[int, Optional[int]] = {}

        def fits(n: int) -> bool:
            if time.time() > stop_at:  # out of time: what was found so far stands (a lower bound)
                out.setdefault("stopped", []).append(f"{s} at {n} tokens: out of time")
                peaks[n] = None
                return False
            peaks[n] = measure(lambda: step(n))
            ok = peaks[n] is not None and peaks[n] <= budget
            shown = "out of memory" if peaks[n] is None else f"{peaks[n] / 2**30:.2f} GiB"
            print(f"  longest {s:18s} {n:7d} tokens: {shown}", flush=True)
            return ok

        n, probes = membench.longest(fits, args.min_tokens, args.max_tokens, args.steps_of)
        out[s] = {"longest": n, "probes": [(m, ok, peaks[m]) for m, ok in probes]}
        del step, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# -- driver ---------------------------------------------------------------------------------------

def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    lines = [f"# GPU check ({results['device']}, {results['date']})", ""]
    for name, r in results.get("smoke", {}).items():
        lines.append(f"- smoke {name}: {'ok' if r.get('ok') else 'FAILED'} {json.dumps(r, default=str)}")
    if results.get("speed", {}).get("table"):
        lines += ["", results["speed"]["table"]]
    if results.get("longest"):
        lines += ["", "| system | longest conversation in one step | probes (tokens: GiB) |", "|---|---|---|"]
        for s, r in results["longest"].items():
            if s == "stopped":
                continue
            probes = ", ".join(f"{m}: {'OOM' if p is None else f'{p / 2**30:.1f}'}" for m, _, p in r.get("probes", []))
            lines.append(f"| {s} | {r.get('longest', r.get('skipped'))} | {probes} |")
    for why in results.get("longest", {}).get("stopped", []):
        lines.append(f"- longest: {why} (the longest found so far is a lower bound)")
    for phase, why in results.get("skipped", {}).items():
        lines.append(f"- {phase}: skipped ({why})")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="issue 15's GPU check: CUDA smoke tests, philora vs TRL + PEFT "
                                 "speed and memory on Phi-3-mini's shape, the longest sequence that fits")
    ap.add_argument("--out", default=str(HERE / "gpu-out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shape, few steps: the plumbing only")
    ap.add_argument("--phases", nargs="+", default=["smoke", "speed", "longest"])
    ap.add_argument("--systems", nargs="+", default=["philora", "trl-cookbook", "trl-padding-free"],
                    choices=list(bench.SYSTEMS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--min-tokens", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=32768, help="longest probe (attention grows as L^2)")
    ap.add_argument("--steps-of", type=int, default=1024)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no phase after this many seconds")
    ap.add_argument("--stop-s", type=float, default=420.0, help="start no probe after this many seconds")
    args = ap.parse_args(sys.argv[1:] if argv is None else list(argv))
    t0 = time.time()
    args.cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if args.cuda else "cpu")
    if not args.cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to check the plumbing on CPU", file=sys.stderr)
        return 2
    shape = bench.SHAPES["tiny" if args.dry_run else "gpu"]
    if args.dry_run:
        args.steps, args.warmup = min(args.steps, 2), 1
        args.min_tokens, args.max_tokens, args.steps_of = 64, 256, 64
    args.max_length, args.loss_steps = shape["max_length"], min(5, args.steps - args.warmup)
    name = torch.cuda.get_device_name(device) if args.cuda else "CPU (dry run)"
    results = {"device": name, "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
               "args": vars(args), "skipped": {}}
    out = Path(args.out)
    print(f"gpu_check on {name}: phases {args.phases}", flush=True)
    with tempfile.TemporaryDirectory(prefix="philora-gpu-") as tmp:
        d = Path(tmp)
        for phase in args.phases:
            elapsed = time.time() - t0
            if elapsed > args.budget_s:
                results["skipped"][phase] = f"{elapsed:.0f} s spent of the {args.budget_s:.0f} s budget"
                write(out, results)
                continue
            t = time.time()
            if phase == "smoke":
                results["smoke"] = smoke(device)
            elif phase == "speed":
                if not (d / "model").exists():
                    make_model_dir(d / "model", shape, device)
                results["speed"] = speed(args, d, shape, args.systems)
            elif phase == "longest":
                if not (d / "model").exists():
                    make_model_dir(d / "model", shape, device)
                budget = (torch.cuda.get_device_properties(device).total_memory if args.cuda
                          else int(membench_rss() + 2 ** 28))  # dry run: 256 MiB above what is resident
                results["longest"] = longest_phase(args, d, device, args.systems, budget, t0 + args.stop_s)
            results.setdefault("seconds", {})[phase] = round(time.time() - t, 1)
            write(out, results)
            print(f"  {phase}: {time.time() - t:.0f} s", flush=True)
    print((out / "results.md").read_text(encoding="utf-8"))
    ok = all(r.get("ok") for r in results.get("smoke", {}).values())
    return 0 if ok else 1


def membench_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
