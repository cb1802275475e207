"""``python bench/data.py``: data preparation at UltraChat scale, philora against TRL.

    python bench/data.py                          # 200k conversations (UltraChat-200k's size)
    python bench/data.py --conversations 20000    # a smaller set, same measurements
    python bench/data.py --quick                  # seconds: 400 conversations, a smoke test

A synthetic UltraChat-like JSONL (multi-turn ``messages`` records of random words from
bench/text.txt, ~1450 Phi-3 tokens per conversation on average, as UltraChat-200k's ~290M tokens
over 208k conversations) is written once; then each measurement runs in a fresh subprocess:

* philora: ``philora.run.train.train`` with ``max_steps=1`` on a small random Phi-3 with the real
  Phi-3 tokenizer (tests/fixtures/phi3-tokenizer): cold (empty data cache) with
  ``data.num_proc=1`` and with all cores, then cached (the cache the cold run left).
* TRL: ``SFTTrainer`` on ``datasets.load_dataset("json", data_files=...)`` of the same file,
  with ``dataset_num_proc`` 1 and all cores, cold (empty datasets cache) and cached; TRL's
  default preprocessing (chat template, tokenization, truncation to the same max_length; loss
  on every token: TRL's assistant-only mask needs ``{% generation %}`` tags Phi-3's template
  lacks, so TRL does less work than philora, which computes assistant-only labels).
* resident memory: the RSS growth of reading every training example once from philora's
  memory-mapped cache, per token; and of the same examples held as Python lists (what
  philora kept before it used Arrow).

Time to first step: from the worker's start (its imports included: every system pays them) to
the first forward pass of training; peak RSS: the worker's high-water mark (VmHWM) and the
largest tokenizing child process's. Hand-written because the comparison is the point: fresh
processes, one file, the same max_length and model for both systems.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.time()
HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / "tests" / "fixtures" / "phi3-tokenizer"
MAX_LENGTH = 2048


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# -- setup (parent) -----------------------------------------------------------------------------

def words():
    body = (HERE / "text.txt").read_text(encoding="utf-8").split("\n\n", 1)[1]
    return sorted({w.strip(".,!?;:'\"") for w in body.split()} - {""})


def write_conversations(path: Path, n: int, seed: int = 0) -> dict:
    """n UltraChat-like conversations: 1-6 user/assistant pairs (3.2 on average), user turns of
    20-165 words, assistant turns of 80-450 words (~1450 Phi-3 tokens per conversation)."""
    rng, vocab = random.Random(seed), [w for w in words() if w.isalpha()]
    turns = 0
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = []
            for _ in range(rng.choice((1, 2, 2, 3, 3, 4, 4, 5, 6))):
                msgs.append({"role": "user", "content": " ".join(rng.choices(vocab, k=rng.randint(20, 165))).capitalize() + "?"})
                msgs.append({"role": "assistant", "content": " ".join(rng.choices(vocab, k=rng.randint(80, 450))).capitalize() + "."})
            turns += len(msgs) // 2
            f.write(json.dumps({"messages": msgs}) + "\n")
    return {"conversations": n, "turn_pairs_mean": round(turns / n, 2), "bytes": path.stat().st_size}


def make_model(path: Path) -> None:
    """A small random Phi-3 (the data path is measured, not the model) with Phi-3's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    cfg = Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                     original_max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    Phi3ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


# -- one measurement (worker subprocess) --------------------------------------------------------

class FirstStep(Exception):
    """Raised by the first forward pass of training: the measurement ends there."""


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def children_peak() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def until_first_forward(run, timing: dict) -> dict:
    """Run ``run()`` until training's first forward pass; time since the worker started, peaks,
    and ``timing`` (the seconds of data preparation the run recorded there)."""
    import torch
    seen = {}

    def hook(module, args):
        if module.training and "t" not in seen:
            seen["t"] = time.time() - START
            raise FirstStep
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        run()
    except FirstStep:
        pass
    finally:
        handle.remove()
    return {"first_step_s": round(seen["t"], 2), "data_s": round(timing.get("data", 0.0), 2),
            "peak_rss": rss("VmHWM"), "children_peak_rss": children_peak()}


def timed(fn, timing: dict):
    def wrapper(*a, **k):
        t = time.time()
        try:
            return fn(*a, **k)
        finally:
            timing["data"] = timing.get("data", 0.0) + time.time() - t
    return wrapper


def run_philora(job: dict) -> dict:
    import philora.run.train
    from philora.core.config import Config, DataConfig, ModelConfig, PeftConfig, TrainingConfig
    from philora.run.train import train
    timing = {}
    philora.run.train.build_datasets = timed(philora.run.train.build_datasets, timing)  # reading + tokenizing
    cfg = Config(
        model=ModelConfig(name_or_path=job["model"], dtype="float32"),
        data=DataConfig(train=job["data"], eval_fraction=0.0, max_length=MAX_LENGTH, num_proc=job["procs"],
                        cache_dir=job["cache"]),
        training_config=TrainingConfig(output_dir=job["out"], max_steps=1, per_device_train_batch_size=4,
                                       save_steps=0, eval_steps=0, report_samples=0, progress_bar=False),
        peft_config=PeftConfig(r=8, lora_alpha=16, lora_dropout=0.0))
    return until_first_forward(lambda: train(cfg, overwrite=True), timing)


def run_trl(job: dict) -> dict:
    os.environ["HF_DATASETS_CACHE"] = job["cache"]
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    timing = {}

    def run():
        ds = timed(datasets.load_dataset, timing)("json", data_files=job["data"], split="train")  # JSON -> Arrow
        tok = AutoTokenizer.from_pretrained(job["model"])
        model = AutoModelForCausalLM.from_pretrained(job["model"])
        args = SFTConfig(output_dir=job["out"], max_length=MAX_LENGTH, dataset_num_proc=job["procs"],
                         per_device_train_batch_size=4, max_steps=1, report_to="none", save_strategy="no",
                         use_cpu=True, disable_tqdm=True, logging_steps=1)
        # SFTTrainer's __init__ tokenizes the dataset (its map, cached by fingerprint)
        timed(SFTTrainer, timing)(model=model, args=args, processing_class=tok, train_dataset=ds).train()
    return until_first_forward(run, timing)


def run_resident(job: dict) -> dict:
    """RSS growth per token (file-backed pages and the heap apart) of building the cached train
    set and reading every example once, as an epoch does; then of holding all examples as Python
    lists (the representation philora used before Arrow)."""
    import gc

    from philora.core.config import DataConfig
    from philora.data.build import build_datasets
    from philora.model.loading import load_tokenizer
    tok = load_tokenizer(job["model"])
    cfg = DataConfig(train=job["data"], eval_fraction=0.0, max_length=MAX_LENGTH, cache_dir=job["cache"])
    warm, _, _ = build_datasets(cfg, tok, 0, log=lambda *a: None)  # every code path once, then let go
    [warm[i] for i in range(min(10, len(warm)))]
    del warm
    gc.collect()
    before = {k: rss(k) for k in ("VmRSS", "RssFile", "RssAnon")}
    train, _, stats = build_datasets(cfg, tok, 0, log=lambda *a: None)
    for i in range(len(train)):
        train[i]
    mapped = {k: rss(k) for k in before}
    lists = [train[i] for i in range(len(train))]
    held = rss("VmRSS")
    tokens = stats["train"]["tokens"]
    per = lambda key: round((mapped[key] - before[key]) / tokens, 2)  # noqa: E731
    return {"tokens": tokens, "examples": len(lists), "label_tokens": stats["train"]["label_tokens"],
            "bytes_per_token_mapped": per("VmRSS"), "file_backed": per("RssFile"), "heap": per("RssAnon"),
            "bytes_per_token_lists": round((held - mapped["VmRSS"]) / tokens, 2)}


def worker(job: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    return {"philora": run_philora, "trl": run_trl, "resident": run_resident}[job["kind"]](job)


# -- driver -------------------------------------------------------------------------------------

def measure(job: dict) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    proc = subprocess.run([sys.executable, __file__, "--worker", f.name], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"{job['name']} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["name"] = job["name"]
    print(json.dumps(result), flush=True)
    return result


def gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="400 conversations: a smoke test")
    ap.add_argument("--procs", type=int, default=cores(), help="'all cores' (default: this machine's)")
    ap.add_argument("--systems", nargs="+", default=["philora", "trl"], choices=["philora", "trl"])
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return 0
    n = 400 if args.quick else args.conversations
    d = Path(args.dir or tempfile.mkdtemp(prefix="philora-data-bench-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        data = d / "train.jsonl"
        info = write_conversations(data, n) if not data.exists() else {"conversations": n, "bytes": data.stat().st_size}
        make_model(d / "model")
        print(f"# {n} conversations, {info['bytes'] / 2 ** 20:.0f} MiB; {args.procs} cores; load {os.getloadavg()[0]:.1f}",
              flush=True)
        results = []
        for system in args.systems:
            for procs in sorted({1, args.procs}):
                cache = d / f"cache-{system}-{procs}"
                shutil.rmtree(cache, ignore_errors=True)
                for state in ("cold", "cached"):
                    job = {"kind": system, "name": f"{system} {state} {procs} proc", "model": str(d / "model"),
                           "data": str(data), "procs": procs, "cache": str(cache), "out": str(d / "out")}
                    results.append({**measure(job), "system": system, "state": state, "procs": procs})
        if "philora" in args.systems:
            res = measure({"kind": "resident", "name": "resident", "model": str(d / "model"), "data": str(data),
                           "cache": str(d / f"cache-philora-{args.procs}")})
        print("\n| system | cache | processes | time to first step | of which data | peak RSS (main) | "
              "peak RSS (tokenizing child) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in results:
            child = gib(r["children_peak_rss"]) if r["children_peak_rss"] else "-"
            print(f"| {r['system']} | {r['state']} | {r['procs']} | {r['first_step_s']:.1f} s | {r['data_s']:.1f} s | "
                  f"{gib(r['peak_rss'])} | {child} |")
        if "philora" in args.systems:
            print(f"\nphilora resident memory after reading all {res['examples']} examples ({res['tokens']} tokens): "
                  f"{res['bytes_per_token_mapped']} bytes/token (file-backed {res['file_backed']}, heap {res['heap']}); "
                  f"as Python lists {res['bytes_per_token_lists']} bytes/token")
    finally:
        if not args.dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
