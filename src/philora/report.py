"""``philora eval``: the base model against the fine-tuned one on a run's eval split.

Reports, as ``report.md`` (tables, the training loss curve) and ``report.json``:
* loss and perplexity per label token (assistant tokens, as in training) for both models;
* greedy generations for N held-out prompts (the conversation up to its last assistant turn),
  side by side with the reference (that turn), scored by exact match, token F1 and ROUGE-L.

One model serves both sides: base + adapter with philora's LoRA layers, and the base is the same
model with every LoRA layer's scaling set to 0 (:func:`lora_disabled`), so the comparison costs
one model in memory and the end of training can reuse the model it has. The eval split is rebuilt
from the run's ``config.yaml`` with data.py's pieces, in build_datasets' order and selection.
The overlap metrics are hand-written (a few lines each; no extra dependency): text is lowercased
and split into words with punctuation dropped, as in SQuAD's scorer (articles are kept).
"""

import contextlib
import json
import math
import random
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .adapter import prepare_output_dir
from .config import Config, DataConfig
from .errors import PhiloraError
from .inject import lora_layers



# -----------------------------------------------------------------------------
# overlap metrics

def words(text: str) -> List[str]:
    """Lowercased words and numbers; punctuation and whitespace separate them."""
    return re.findall(r"\w+", text.lower())


def exact_match(pred: str, ref: str) -> float:
    return float(words(pred) == words(ref))


def token_f1(pred: str, ref: str) -> float:
    """F1 of the bags of words (SQuAD's token F1)."""
    p, r = words(pred), words(ref)
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: longest common subsequence of words, 2 * lcs / (len(pred) + len(ref))."""
    p, r = words(pred), words(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return 2 * prev[-1] / (len(p) + len(r))


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}
LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L"}


# -----------------------------------------------------------------------------
# the eval split as conversations

def encoded_conversations(source: str, split: str, dc: DataConfig, tokenizer) -> List[Tuple[list, dict]]:
    """(messages, {"input_ids", "labels"}) of a data source, kept and cut as data.py does."""
    from .data import IGNORE_INDEX, DataError, encode_chat, load_records, to_messages

    errors = [] if dc.skip_bad_records else None
    pairs = []
    for where, record in load_records(source, split, errors=errors):
        try:
            messages = to_messages(record, dc.format, where)
        except DataError:
            if errors is None:
                raise
            continue
        ex = encode_chat(messages, tokenizer)
        if len(ex["input_ids"]) > dc.max_length:
            if dc.truncation == "drop":
                continue
            ex = {k: v[:dc.max_length] for k, v in ex.items()}
        if all(t == IGNORE_INDEX for t in ex["labels"]):
            continue
        pairs.append((messages, ex))
    return pairs


def eval_conversations(cfg: Config, tokenizer) -> List[Tuple[list, dict]]:
    """The run's eval split, the same examples in the same order as data.build_datasets."""
    from .data import DataError, MissingSplit, is_dataset_name

    dc, seed = cfg.data, cfg.training_config.seed
    if dc.eval:
        return encoded_conversations(dc.eval, dc.eval_split, dc, tokenizer)
    if dc.train == "sample" or is_dataset_name(dc.train):
        try:
            return encoded_conversations(dc.train, dc.eval_split, dc, tokenizer)
        except MissingSplit:
            pass
    train = encoded_conversations(dc.train, dc.train_split, dc, tokenizer)
    n = len(train)
    n_eval = max(1, round(n * dc.eval_fraction)) if dc.eval_fraction > 0 else 0
    if n_eval >= n:
        raise DataError(f"{dc.train}: {n} example(s) are too few to hold out eval_fraction={dc.eval_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [pair for k, pair in enumerate(train) if k in held]


def held_out(messages: Sequence[dict]) -> Tuple[List[dict], str]:
    """(prompt: the conversation before its last assistant turn, reference: that turn)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return [dict(role=m["role"], content=m["content"]) for m in messages[:last]], messages[last]["content"]


# -----------------------------------------------------------------------------
# loss, base vs fine-tuned

@contextlib.contextmanager
def lora_disabled(model):
    """The base model: every LoRA layer's scaling is 0 inside the block (restored after)."""
    layers = list(lora_layers(model).values())
    if any(getattr(m, "merged", False) for m in layers):
        raise PhiloraError("the model's LoRA weights are merged; cannot switch them off")
    saved = [m.scaling for m in layers]
    try:
        for m in layers:
            m.scaling = 0.0
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def eval_loss(model, examples: List[dict], pad_id: int, dc: DataConfig, batch_size: int) -> Dict[str, float]:
    """Loss per label token (as training's eval: the same collate and loss) and perplexity."""
    from .batching import collate
    from .loss import CausalLMLoss

    loss_fn, device = CausalLMLoss(model), next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s:s + batch_size], pad_id, dc.packing, dc.max_length)
        loss_sum, n = loss_fn({k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "label_tokens": count}


def score(pairs: Sequence[Tuple[str, str]]) -> Dict[str, float]:
    """Mean of each overlap metric over (prediction, reference) pairs."""
    return {k: sum(f(p, r) for p, r in pairs) / max(len(pairs), 1) for k, f in METRICS.items()}


# -----------------------------------------------------------------------------
# the report

def evaluate_run(run, data: Optional[str] = None, out=None, samples: int = 8, max_new_tokens: int = 128,
                 force: bool = False, model=None, tokenizer=None, eval_examples=None) -> dict:
    """Evaluate base vs fine-tuned for a run (or adapter) directory; writes report.md and
    report.json to ``out`` (which may be the run directory: nothing else in it is touched).
    ``model`` (with philora LoRA layers), ``tokenizer`` and encoded ``eval_examples`` let the
    end of training reuse what it has. Returns the report as a dict."""
    from .generate import chat_ids, generate_ids, load_source, resolve_source

    if out is None:
        raise PhiloraError("evaluate_run: give an output directory (--out)")
    src = resolve_source(str(run))
    if src.adapter_dir is None:
        raise PhiloraError(f"{run}: not a run or adapter directory (no adapter_config.json)")
    cfg = src.run_cfg
    if cfg is None and data is None:
        raise PhiloraError(f"{run}: no config.yaml (not a philora run), so no eval split: pass --data FILE")
    out_dir = prepare_output_dir(out, force)  # out may be the run: only the report files are written
    if model is None:
        model, tokenizer, _ = load_source(str(run))
    elif tokenizer is None:
        from .loading import load_tokenizer, resolve_path
        tokenizer = load_tokenizer(src.tokenizer_path or resolve_path(src.model_cfg.name_or_path))
    dc = cfg.data if cfg else DataConfig()
    if data:
        pairs = encoded_conversations(data, dc.eval_split, replace(dc, skip_bad_records=False), tokenizer)
        described, eval_examples = data, None
    else:
        pairs = eval_conversations(cfg, tokenizer)
        described = dc.eval or f"{dc.train} (eval split)"
    if not pairs:
        if eval_examples is not None:  # the end of a run with no eval split: nothing to report
            print("eval: no eval conversations, no report")
            return {}
        raise PhiloraError(f"{data or run}: no eval conversations to report on")
    limit = cfg.training_config.eval_max_samples if cfg else 0
    examples = eval_examples if eval_examples is not None else [ex for _, ex in pairs][:limit or None]
    batch_size = cfg.training_config.per_device_eval_batch_size if cfg else 8
    prompts = [held_out(m) for m, _ in pairs[:samples]]
    ids = [chat_ids(tokenizer, p) for p, _ in prompts]
    refs = [r for _, r in prompts]
    results = {}
    with eval_mode(model):
        for side, ctx in (("fine_tuned", contextlib.nullcontext()), ("base", lora_disabled(model))):
            with ctx:
                loss = eval_loss(model, examples, tokenizer.pad_token_id, dc, batch_size)
                replies = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens) if ids else []
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
            results[side] = {"loss": loss["loss"], "perplexity": loss["perplexity"],
                             **score(list(zip(texts, refs))), "generations": texts}
    report = {
        "run": str(run), "base_model": src.model_cfg.name_or_path, "data": described,
        "eval_examples": len(examples), "label_tokens": loss["label_tokens"], "max_new_tokens": max_new_tokens,
        "base": {k: v for k, v in results["base"].items() if k != "generations"},
        "fine_tuned": {k: v for k, v in results["fine_tuned"].items() if k != "generations"},
        "samples": [],
    }
    for k, (prompt, ref) in enumerate(prompts):
        base, tuned = results["base"]["generations"][k], results["fine_tuned"]["generations"][k]
        report["samples"].append({"prompt": prompt, "reference": ref, "base": base, "fine_tuned": tuned,
                                  "scores": {"base": score([(base, ref)]), "fine_tuned": score([(tuned, ref)])}})
    report["loss_plot"] = _loss_plot(Path(run), out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    print(f"eval: loss {report['base']['loss']:.4f} (base) -> {report['fine_tuned']['loss']:.4f} "
          f"(fine-tuned); report: {out_dir / 'report.md'}")
    return report


def _loss_plot(run: Path, out_dir: Path) -> Optional[str]:
    from .metrics import plot_losses
    if (run / "metrics.jsonl").is_file():
        path = plot_losses(run, path=out_dir / "loss.png")
        return path.name if path else None
    return None


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, newlines as <br>."""
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return text or "*(empty)*"


def markdown(report: dict) -> str:
    b, t = report["base"], report["fine_tuned"]
    lines = [
        "# philora eval report", "",
        f"Run `{report['run']}` on base model `{report['base_model']}`; eval data: {report['data']} "
        f"({report['eval_examples']} conversations, {report['label_tokens']} label tokens).", "",
        "## Loss", "",
        "| model | loss | perplexity |", "|---|---:|---:|",
        f"| base | {b['loss']:.4f} | {b['perplexity']:.2f} |",
        f"| fine-tuned | {t['loss']:.4f} | {t['perplexity']:.2f} |", "",
    ]
    if report.get("loss_plot"):
        lines += [f"![training loss]({report['loss_plot']})", ""]
    n = len(report["samples"])
    lines += [f"## Generations ({n} held-out prompts, greedy, up to {report['max_new_tokens']} new tokens)", "",
              "| metric | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {LABELS[name]} | {b[name]:.3f} | {t[name]:.3f} |" for name in METRICS]
    if n:
        lines += ["", "| # | prompt (last user turn) | reference | base | fine-tuned |", "|---|---|---|---|---|"]
    for k, s in enumerate(report["samples"], 1):
        last_user = next((m["content"] for m in reversed(s["prompt"]) if m["role"] == "user"), "")
        lines.append(f"| {k} | {_cell(last_user)} | {_cell(s['reference'])} | {_cell(s['base'])} | "
                     f"{_cell(s['fine_tuned'])} |")
    return "\n".join(lines) + "\n"
