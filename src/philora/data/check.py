"""``philora data check``: what a config's data will train on, before any model loads.

Only the tokenizer is loaded. Each source is tokenized exactly as training does it (through the
same cache, so the run that follows starts without tokenizing), and the report gives, per source
and in total: records, examples, bad records (each as ``file:line: what is wrong``, up to
``ERROR_LIMIT``, then a count), truncated and dropped counts with the reason, token-length
percentiles and a histogram (``lengths.png`` with ``--out``), the share of tokens trained on,
conversations with no trainable token, exact duplicates (the same conversation twice; and eval
conversations that are also in train), what each source puts into an epoch, and the optimizer
steps per epoch the config implies. Exit status 1 when a record is bad or the data cannot train
(nothing to train on, too few examples to hold out an eval split), else 0.
"""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from ..core.config import Config
from ..core.diskio import write_text
from ..core.errors import PhiloraError
from .build import BAD, NO_LABELS, TOO_LONG, TRUNCATED, build_datasets, sources, tokenize
from .encoding import template_inputs
from .examples import column, epoch_size
from .preference import SAMPLE as SAMPLE_PAIRS
from .preference import load_pairs, pair_report
from .records import MissingSplit, is_dataset_name, label

ERROR_LIMIT = 50  # bad records listed one per line; the rest are counted
PERCENTILES = (50, 90, 95, 99)


def _lengths(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {}
    out = {"min": int(lengths.min())}
    out.update({f"p{q}": int(np.percentile(lengths, q, method="inverted_cdf")) for q in PERCENTILES})
    out.update({"max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)})
    return out


def _histogram(lengths: np.ndarray, max_length: int, bins: int = 20) -> dict:
    top = max(int(lengths.max()) if len(lengths) else 1, max_length)
    counts, edges = np.histogram(lengths, bins=bins, range=(0, top))
    return {"edges": [int(round(e)) for e in edges], "counts": [int(c) for c in counts]}


def source_report(table, role: str, path: str, split: str, weight: float, fmt: str, max_length: int) -> dict:
    """Counts of one tokenized source (all its records, before any train/eval split)."""
    status = column(table, "status")
    kept = np.flatnonzero(status <= TRUNCATED)
    full = column(table, "full_length")
    lengths = np.minimum(full[kept], max_length)
    labels = column(table, "num_labels")[kept]
    hashes = column(table, "hash")[kept]
    tokens = int(lengths.sum())
    bad = np.flatnonzero(status == BAD)
    errors = table.column("error").take(bad[:ERROR_LIMIT]).to_pylist()
    return {
        "role": role, "path": path, "source": label(path, split), "weight": weight, "format": fmt,
        "records": len(status), "examples": len(kept), "skipped": len(bad),
        "truncated": int((status == TRUNCATED).sum()), "dropped_too_long": int((status == TOO_LONG).sum()),
        "dropped_no_labels": int((status == NO_LABELS).sum()),
        "no_trainable_token": int((status == NO_LABELS).sum()),
        "tokens": tokens, "label_tokens": int(labels.sum()),
        "trained_share": round(float(labels.sum()) / tokens, 4) if tokens else 0.0,
        "duplicates": int(len(hashes) - len(np.unique(hashes))),
        "lengths": _lengths(lengths), "untruncated_lengths": _lengths(full[status <= NO_LABELS]),
        "over_max_length": int((full > max_length).sum()),
        "histogram": _histogram(full[status <= NO_LABELS], max_length),
        "bad_records": errors, "_hashes": hashes,
        "tools_without_description": _tools_without_description(table.column("messages").take(kept).to_pylist()),
    }


def _tools_without_description(conversations: List[Optional[str]]) -> int:
    """Conversations with a function definition that has no "description": servers fill one in (vLLM
    null, llama-server ""), so the prompt they build is not the trained one (encoding.served_tool)."""
    count = 0
    for text in conversations:
        if text and '"tools"' in text:  # the tools as training gives them to the template, served_tool's shape
            tools = template_inputs(json.loads(text))[1].get("tools", [])
            count += any("description" not in t["function"] for t in tools if isinstance(t, dict) and "function" in t)
    return count


def _total(reports: List[dict]) -> dict:
    keys = ("records", "examples", "skipped", "truncated", "dropped_too_long", "dropped_no_labels",
            "no_trainable_token", "tokens", "label_tokens", "over_max_length")
    total = {k: sum(r[k] for r in reports) for k in keys}
    total["trained_share"] = round(total["label_tokens"] / total["tokens"], 4) if total["tokens"] else 0.0
    hashes = np.concatenate([r["_hashes"] for r in reports]) if reports else np.zeros(0)
    total["duplicates"] = int(len(hashes) - len(np.unique(hashes)))
    return total


def check(cfg: Config, tokenizer, processes: int = 1, log: Callable = print) -> dict:
    """The data report of ``cfg`` (a dict, JSON-able), tokenized with the model's ``tokenizer``."""
    dc, tc = cfg.data, cfg.training_config
    roles = [("train", s) for s in sources(dc.train, dc, dc.train_split)]
    if dc.eval:
        roles += [("eval", s) for s in sources(dc.eval, dc, dc.eval_split)]
    else:  # a hub dataset's (or "sample"'s) own eval split, where it has one
        roles += [("eval", replace(s, split=dc.eval_split, weight=1.0)) for _, s in roles
                  if s.path == "sample" or is_dataset_name(s.path)]
    reports = []
    for role, src in roles:
        try:
            table, _ = tokenize(src, dc, tokenizer, log, role)
        except MissingSplit:  # no eval split: training holds out eval_fraction instead
            continue
        reports.append(source_report(table, role, src.path, src.split, src.weight, src.format, dc.max_length))
    report = {"max_length": dc.max_length, "truncation": dc.truncation, "sources": reports, "problems": []}
    # The split and epochs exactly as training makes them (bad records skipped: listed above).
    try:
        train, evals, stats = build_datasets(replace(dc, skip_bad_records=True), tokenizer, tc.seed, log=log)
    except PhiloraError as e:
        report["problems"].append(str(e))
        train, evals, stats = None, [], None
    train_reports = [r for r in reports if r["role"] == "train"]
    report["train"] = _total(train_reports)
    report["eval"] = _total([r for r in reports if r["role"] == "eval"])
    if train is not None:
        per_step = tc.per_device_train_batch_size * tc.gradient_accumulation_steps * processes
        n = epoch_size(train)
        for r, s in zip(train_reports, stats["train"]["sources"]):
            r["per_epoch"] = s["per_epoch"]
            r["train_examples"] = s["examples"]  # after holding out eval examples
        report["train"].update({
            "examples_after_split": len(train), "per_epoch": {"examples": n, "label_tokens": sum(
                s["per_epoch"]["label_tokens"] for s in stats["train"]["sources"])},
            "processes": processes, "examples_per_step": per_step, "steps_per_epoch": math.ceil(n / per_step),
        })
        report["eval"].update({"examples": len(evals), "source": stats["eval"]["source"],
                               "tokens": stats["eval"]["tokens"], "label_tokens": stats["eval"]["label_tokens"]})
        eval_reports = [r for r in reports if r["role"] == "eval"]
        if eval_reports:  # separate eval data (held-out examples are train rows, never duplicates)
            train_hashes = set(np.concatenate([r["_hashes"] for r in train_reports]).tolist())
            ev = np.concatenate([r["_hashes"] for r in eval_reports])
            report["eval"]["also_in_train"] = int(sum(h in train_hashes for h in ev.tolist()))
    if tc.max_steps > 0:
        report["train"]["max_steps"] = tc.max_steps
    bad = sum(r["skipped"] for r in reports)
    report["bad_records"] = bad
    report["ok"] = bad == 0 and not report["problems"]
    for r in reports:
        for k in [k for k in r if k.startswith("_")]:
            r.pop(k)
    return report


def text(report: dict) -> str:
    """The report as lines for a terminal."""
    out = []

    def counts(r: dict, indent: str) -> None:
        out.append(f"{indent}{r['records']} records: {r['examples']} examples, {r['skipped']} bad, "
                   f"{r['truncated']} truncated, {r['dropped_too_long']} dropped as longer than max_length "
                   f"{report['max_length']}, {r['dropped_no_labels']} dropped with no trainable token")
        out.append(f"{indent}{r['tokens']} tokens, {r['label_tokens']} trained on ({100 * r['trained_share']:.1f}%); "
                   f"{r['duplicates']} exact duplicates")

    for r in report["sources"]:
        out.append(f"{r['role']}: {r['source']} (weight {r['weight']:g}, format {r['format']})")
        counts(r, "  ")
        if r["lengths"]:
            out.append("  tokens per example: " + ", ".join(f"{k} {v}" for k, v in r["lengths"].items()))
        if "per_epoch" in r:
            out.append(f"  per epoch: {r['per_epoch']['examples']} examples, {r['per_epoch']['label_tokens']} label tokens")
        if r.get("tools_without_description"):
            out.append(f"  warning: {r['tools_without_description']} conversations define a tool with no \"description\": "
                       f"servers fill one in (vLLM null, llama-server \"\"), so their prompt is not the trained one")
    if sum(r["role"] == "train" for r in report["sources"]) > 1:
        out.append("train total:")
        counts(report["train"], "  ")
    t, e = report["train"], report["eval"]
    if "source" in e:
        also = f"; {e['also_in_train']} also in train" if "also_in_train" in e else ""
        out.append(f"eval set: {e['examples']} examples ({e['source']}), {e['tokens']} tokens, "
                   f"{e['label_tokens']} trained on{also}")
    if "steps_per_epoch" in t:
        out.append(f"per epoch: {t['per_epoch']['examples']} examples, {t['per_epoch']['label_tokens']} label "
                   f"tokens; {t['steps_per_epoch']} optimizer steps of {t['examples_per_step']} examples "
                   f"({t['processes']} process{'es' if t['processes'] > 1 else ''})"
                   + (f"; max_steps={t['max_steps']} overrides epochs" if "max_steps" in t else ""))
    for p in report["problems"]:
        out.append(f"problem: {p}")
    bad = report["bad_records"]
    if bad:
        out.append(f"bad records ({bad}):")
        shown = [line for r in report["sources"] for line in r["bad_records"]][:ERROR_LIMIT]
        out.extend(shown)
        if bad > len(shown):
            out.append(f"... and {bad - len(shown)} more bad records")
    out.append("data check: " + ("ok" if report["ok"] else "problems found"))
    return "\n".join(out)


def plot(report: dict, path: Path) -> Path:
    """Token-length histogram of each source (before truncation), max_length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in report["sources"]:
        h = r["histogram"]
        centers = [(a + b) / 2 for a, b in zip(h["edges"], h["edges"][1:])]
        ax.step(centers, h["counts"], where="mid", label=f"{r['role']}: {r['source']}")
    ax.axvline(report["max_length"], color="red", linestyle="--", label=f"max_length {report['max_length']}")
    ax.set_xlabel("tokens per conversation (before truncation)")
    ax.set_ylabel("conversations")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def check_pairs(cfg: Config, tokenizer, log: Callable = print) -> dict:
    """The data report of a preference objective (dpo, orpo, simpo): per source, the pairs, bad
    records, truncation, pairs whose chosen equals rejected, and token lengths (preference.pair_report)."""
    dc = cfg.data
    roles = [("train", s) for s in sources(dc.train, dc, dc.train_split)]
    if dc.eval:
        roles += [("eval", s) for s in sources(dc.eval, dc, dc.eval_split)]
    else:  # the shipped sample's own eval split, as build_pairs takes it
        roles += [("eval", replace(s, split=dc.eval_split)) for _, s in roles if s.path == SAMPLE_PAIRS]
    reports = []
    for role, src in roles:
        pairs, counts = load_pairs(src.path, src.split, replace(dc, skip_bad_records=True), tokenizer, log)
        reports.append({"role": role, "path": src.path, **pair_report(pairs, counts)})
    problems = [f"{r['path']}: no pair to train on" for r in reports if r["role"] == "train" and not r["pairs"]]
    ok = not problems and not any(r["bad_records"] for r in reports)
    return {"objective": cfg.training_config.objective, "max_length": dc.max_length, "sources": reports,
            "problems": problems, "ok": ok}


def pairs_text(report: dict) -> str:
    out = [f"objective {report['objective']}, max_length {report['max_length']}"]
    for r in report["sources"]:
        out.append(f"{r['role']}: {r['path']}: {r['records']} records: {r['pairs']} pairs, {r['skipped']} bad, "
                   f"{r['truncated']} truncated, {r['dropped_too_long']} dropped (too long), "
                   f"{r['chosen_equals_rejected']} with chosen == rejected")
        out += [f"  bad: {e}" for e in r["bad_records"]]
        out += [f"  chosen == rejected: {w}" for w in r["chosen_equals_rejected_at"]]
        for side, q in r["lengths"].items():
            if q:
                out.append(f"  {side} tokens: min {q['min']}, median {q['p50']}, p95 {q['p95']}, max {q['max']}")
    out += [f"problem: {p}" for p in report["problems"]]
    out.append("data check: ok" if report["ok"] else "data check: problems found")
    return "\n".join(out)


def check_cli(cfg: Config, tokenizer, as_json: bool = False, out: Optional[str] = None,
              processes: int = 1) -> int:
    """``philora data check``: the report on stdout (text, or one JSON object with ``--json``;
    tokenizing progress on stderr), files in ``out``; exit status 1 on bad records or problems."""
    log = lambda *a, **k: print(*a, file=sys.stderr, **k)  # noqa: E731
    if cfg.training_config.objective != "sft":
        report = check_pairs(cfg, tokenizer, log)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            write_text(Path(out) / "data_check.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(json.dumps(report, ensure_ascii=False) if as_json else pairs_text(report))
        return 0 if report["ok"] else 1
    report = check(cfg, tokenizer, processes, log=log)
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "data_check.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        plot(report, d / "lengths.png")
        report["files"] = [str(d / "data_check.json"), str(d / "lengths.png")]
    print(json.dumps(report, ensure_ascii=False) if as_json else text(report))
    return 0 if report["ok"] else 1
