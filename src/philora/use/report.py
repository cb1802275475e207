"""``philora eval``: the base model against the fine-tuned one on a run's eval split.

Reports, as ``report.md`` (tables, the training loss curve) and ``report.json``:
* loss and perplexity per label token (assistant tokens, as in training) for both models;
* greedy generations for N held-out prompts (the conversation up to its last assistant turn),
  side by side with the reference (that turn), scored by exact match, token F1 and ROUGE-L;
* when the eval conversations have assistant tool calls (in the model family's syntax,
  use/toolcalls.py), a function-calling score for both models: every assistant turn with calls
  (up to N) is a held-out prompt, and the greedy reply's calls are matched by name and arguments;
* with ``training_config.eval_generations``, how the answers to the same eval prompts changed
  over training (from the run's ``metrics.jsonl``).

One model serves both sides: base + adapter with philora's LoRA layers, and the base is the same
model with every LoRA layer's scaling set to 0 (:func:`lora_disabled`; a DoRA layer is then the
base too, magnitude included), so the comparison costs
one model in memory and the end of training reuses the model it has. The eval split is the one
``data.build_datasets`` makes (from the run's ``config.yaml``) and the loss is ``train.evaluate``:
the numbers are those training logged, by construction.
The overlap metrics are hand-written (a few lines each; no extra dependency): text is lowercased
and split into words with punctuation dropped, as in SQuAD's scorer (articles are kept).
"""

import contextlib
import json
import math
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..lora import lora_layers
from ..core.config import Config
from ..core.diskio import write_text
from ..core.errors import PhiloraError, first_line
from ..data.build import build_datasets, encode_source
from ..data.encoding import IGNORE_INDEX
from ..data.preference import build_pairs, load_pairs
from ..model.decoding import chat_ids, generate_ids
from ..model.families import tool_call_format
from ..model.loading import load_source, resolve_source
from ..model.loss import CausalLMLoss
from ..model.preference_ref import preference_accuracy
from ..run.evalgen import held_out
from ..run.metrics import plot_losses, read_metrics
from ..run.outdir import LOSS_PLOT, METRICS_FILE, REPORT_JSON, REPORT_MD
from ..run.train import TrainResult, evaluate
from .toolcalls import call_turns, function_calling_score, parse_tool_calls, show_calls



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
# held-out prompts, base vs fine-tuned

def generations_over_training(run: Path) -> List[dict]:
    """The answers ``training_config.eval_generations`` recorded in the run's metrics.jsonl, per
    prompt: [{"prompt", "reference", "outputs": [{"step", "output"}, ...]}], in step order."""
    if not (run / METRICS_FILE).is_file():
        return []
    out: List[dict] = []
    for rec in sorted((r for r in read_metrics(run) if r.get("generations")), key=lambda r: r["step"]):
        for i, g in enumerate(rec["generations"]):
            if i == len(out):
                out.append({"prompt": g["prompt"], "reference": g["reference"], "outputs": []})
            out[i]["outputs"].append({"step": rec["step"], "output": g["output"]})
    return out


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


def score(pairs: Sequence[Tuple[str, str]]) -> Dict[str, float]:
    """Mean of each overlap metric over (prediction, reference) pairs."""
    return {k: sum(f(p, r) for p, r in pairs) / max(len(pairs), 1) for k, f in METRICS.items()}


# -----------------------------------------------------------------------------
# the report

def evaluate_run(run, data: Optional[str] = None, out=None, samples: int = 8,
                 max_new_tokens: int = 128) -> dict:
    """``philora eval``: base vs fine-tuned for a run (or adapter) directory on the run's eval
    split (data.build_datasets: the examples training evaluated on) or on ``data``; writes
    report.md and report.json to ``out``. Returns the report as a dict."""
    if out is None:
        raise PhiloraError("evaluate_run: give an output directory (--out)")
    src = resolve_source(str(run))
    if src.adapter_dir is None:
        raise PhiloraError(f"{run}: not a run or adapter directory (no adapter_config.json)")
    cfg = src.run_cfg
    if cfg is None and data is None:
        raise PhiloraError(f"{run}: no config.yaml (not a philora run), so no eval split: pass --data FILE")
    cfg = cfg or Config(model=src.model_cfg)
    model, tokenizer, _ = load_source(str(run))
    quiet = lambda *a, **k: None  # noqa: E731 (training already logged the data counts)
    strict = replace(cfg.data, skip_bad_records=False)
    if cfg.training_config.objective != "sft":  # preference pairs, as training read them
        examples = load_pairs(data, cfg.data.eval_split, strict, tokenizer, quiet, messages=True)[0] if data \
            else build_pairs(cfg.data, tokenizer, cfg.training_config.seed, log=quiet)[1]
    elif data:
        examples, _ = encode_source(data, cfg.data.eval_split, strict, tokenizer, quiet)
    else:
        _, examples, _ = build_datasets(cfg.data, tokenizer, cfg.training_config.seed, log=quiet)
    limit = cfg.training_config.eval_max_samples
    examples = examples[:limit] if limit > 0 else examples
    if not examples:
        raise PhiloraError(f"{data or run}: no eval conversations to report on")
    described = data or cfg.data.eval or f"{cfg.data.train} (eval split)"
    return write_report(model, tokenizer, cfg, examples, Path(run), Path(out), described, samples,
                        max_new_tokens)


def end_of_run(result: TrainResult, cfg: Config) -> Optional[dict]:
    """The report that ends ``philora train`` (rank 0, ``report_samples`` > 0, an eval split),
    on the model and eval examples the run already has. The run is finished and saved by now,
    so nothing here may fail it: any error becomes one warning line."""
    if not result.main or cfg.training_config.report_samples <= 0:
        return None
    if not result.eval_examples:
        print("eval: no eval conversations, no report")
        return None
    try:
        return write_report(result.model, result.tokenizer, cfg, result.eval_examples, result.output_dir,
                            result.output_dir, cfg.data.eval or f"{cfg.data.train} (eval split)",
                            cfg.training_config.report_samples)
    except Exception as e:  # noqa: BLE001 (the adapter is saved: a report problem must not undo that)
        print(f"philora: warning: the run finished and is saved in {result.output_dir}, but the "
              f"end-of-run report failed: {type(e).__name__}: {first_line(e)}", file=sys.stderr)
        return None


def write_report(model, tokenizer, cfg: Config, examples: List[dict], run: Path, out_dir: Path,
                 described: str, samples: int, max_new_tokens: int = 128) -> dict:
    """Base vs fine-tuned on ``examples`` (encoded, with their "messages"): loss, perplexity and
    ``samples`` greedy generations; writes report.md / report.json (and loss.png) to ``out_dir``,
    which may be the run directory: nothing else in it is touched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    prompts = [held_out(ex["messages"]) for ex in examples[:samples]]
    ids = [chat_ids(tokenizer, p) for p, _ in prompts]
    refs = [r for _, r in prompts]
    loss_fn = CausalLMLoss(model)
    results = {}
    with eval_mode(model):
        for side, ctx in (("fine_tuned", contextlib.nullcontext()), ("base", lora_disabled(model))):
            with ctx:
                fit = _fit(model, loss_fn, examples, cfg, tokenizer.pad_token_id, device)
                replies = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens) if ids else []
            texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
            results[side] = {**fit, **score(list(zip(texts, refs))), "generations": texts}
    label_tokens = sum(sum(t != IGNORE_INDEX for t in ex["labels"][1:]) for ex in examples) \
        if cfg.training_config.objective == "sft" else None
    report = {
        "run": str(run), "base_model": cfg.model.name_or_path, "data": described,
        "eval_examples": len(examples), "label_tokens": label_tokens, "max_new_tokens": max_new_tokens,
        "base": {k: v for k, v in results["base"].items() if k != "generations"},
        "fine_tuned": {k: v for k, v in results["fine_tuned"].items() if k != "generations"},
        "samples": [],
    }
    for k, (prompt, ref) in enumerate(prompts):
        base, tuned = results["base"]["generations"][k], results["fine_tuned"]["generations"][k]
        report["samples"].append({"prompt": prompt, "reference": ref, "base": base, "fine_tuned": tuned,
                                  "scores": {"base": score([(base, ref)]), "fine_tuned": score([(tuned, ref)])}})
    report["function_calling"] = function_calling(model, tokenizer, examples, samples, max_new_tokens)
    report["loss_plot"] = _loss_plot(run, out_dir)
    report["during_training"] = generations_over_training(run)
    write_text(out_dir / REPORT_JSON, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text(out_dir / REPORT_MD, markdown(report))  # atomic: a full disk keeps the older report
    key = "loss" if "loss" in report["base"] else "preference_accuracy"
    print(f"eval: {key.replace('_', ' ')} {report['base'][key]:.4f} (base) -> {report['fine_tuned'][key]:.4f} "
          f"(fine-tuned); report: {out_dir / 'report.md'}")
    return report


def _fit(model, loss_fn, examples: List[dict], cfg: Config, pad_id: int, device) -> dict:
    """How well the model fits the eval set: loss and perplexity per label token (SFT), or for
    preference pairs the reference-free preference accuracy (chosen's mean log-prob above rejected's)."""
    if cfg.training_config.objective == "sft":
        loss = evaluate(loss_fn, examples, cfg, pad_id, device)["eval_loss"]
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    return preference_accuracy(model, examples, pad_id, cfg.data.packing, cfg.data.max_length,
                               cfg.training_config.per_device_eval_batch_size, device)


def function_calling(model, tokenizer, examples: List[dict], samples: int, max_new_tokens: int = 128) -> Optional[dict]:
    """Base vs fine-tuned on the first ``samples`` assistant turns with tool calls in ``examples``
    (greedy; calls parsed in the model family's format): ``function_calling_score`` per side and
    each turn's calls. None when the model has no known format or no turn has calls."""
    fmt = tool_call_format(tokenizer)
    turns = [t for ex in examples for t in call_turns(ex["messages"], fmt)][:samples]
    if not turns:
        return None
    ids = [chat_ids(tokenizer, prompt) for prompt, _ in turns]
    out = {"format": fmt, "turns": []}
    calls = {}
    with eval_mode(model):
        for side, ctx in (("fine_tuned", contextlib.nullcontext()), ("base", lora_disabled(model))):
            with ctx:
                replies = generate_ids(model, tokenizer, ids, max_new_tokens=max_new_tokens)
            calls[side] = [parse_tool_calls(tokenizer.decode(r, skip_special_tokens=False), fmt) for r in replies]
            out[side] = function_calling_score(list(zip(calls[side], (ref for _, ref in turns))))
    out["turns"] = [{"prompt": prompt, "reference": ref, "base": b, "fine_tuned": t}
                    for (prompt, ref), b, t in zip(turns, calls["base"], calls["fine_tuned"])]
    return out


def _function_calling_md(fc: Optional[dict]) -> List[str]:
    if not fc:
        return []
    b, t = fc["base"], fc["fine_tuned"]
    lines = ["", f"## Function calling ({b['turns']} held-out turns with {b['calls']} tool calls, `{fc['format']}` "
                 f"format, greedy)", "", "| metric | base | fine-tuned |", "|---|---:|---:|"]
    lines += [f"| {label} | {b[k]:.3f} | {t[k]:.3f} |" for k, label in (
        ("exact_match", "calls exact (name + arguments)"), ("name_match", "calls with the right name"),
        ("turns_exact", "turns exact"))]
    lines += [f"| calls made | {b['predicted']} | {t['predicted']} |", "",
              "| # | prompt (last user turn) | reference | base | fine-tuned |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {_cell(last_user_turn(x['prompt']))} | {_cell(show_calls(x['reference']))} | "
              f"{_cell(show_calls(x['base']))} | {_cell(show_calls(x['fine_tuned']))} |"
              for k, x in enumerate(fc["turns"], 1)]
    return lines


def _loss_plot(run: Path, out_dir: Path) -> Optional[str]:
    if (run / METRICS_FILE).is_file():
        path = plot_losses(run, path=out_dir / LOSS_PLOT)
        return path.name if path else None
    return None


def _cell(text: str) -> str:
    """Text for a markdown table cell: pipes escaped, newlines as <br>."""
    text = text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")
    return text or "*(empty)*"


def markdown(report: dict) -> str:
    b, t = report["base"], report["fine_tuned"]
    lines = ["# philora eval report", "",
             f"Run `{report['run']}` on base model `{report['base_model']}`; eval data: {report['data']} "
             f"({report['eval_examples']} " + (f"conversations, {report['label_tokens']} label tokens)."
                                               if "loss" in b else "preference pairs)."), ""]
    if "loss" in b:
        lines += ["## Loss", "", "| model | loss | perplexity |", "|---|---:|---:|",
                  f"| base | {b['loss']:.4f} | {b['perplexity']:.2f} |",
                  f"| fine-tuned | {t['loss']:.4f} | {t['perplexity']:.2f} |", ""]
    else:  # preference pairs: chosen preferred over rejected (mean per-token log-prob), no reference model
        lines += ["## Preference accuracy", "", "| model | preference accuracy | mean log-prob margin |",
                  "|---|---:|---:|",
                  f"| base | {b['preference_accuracy']:.3f} | {b['logp_margin']:.4f} |",
                  f"| fine-tuned | {t['preference_accuracy']:.3f} | {t['logp_margin']:.4f} |", ""]
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
    lines += _function_calling_md(report.get("function_calling"))
    during = report.get("during_training") or []
    if during:
        lines += ["", f"## Answers during training ({len(during)} eval prompts, greedy, at every evaluation)"]
    for k, g in enumerate(during, 1):
        lines += ["", f"**{k}.** {_cell(last_user_turn(g['prompt']))} (reference: {_cell(g['reference'])})", "",
                  "| step | answer |", "|---:|---|"]
        lines += [f"| {o['step']} | {_cell(o['output'])} |" for o in g["outputs"]]
    return "\n".join(lines) + "\n"


def last_user_turn(prompt: List[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
