"""How far each engine's greedy replies agree with the reference's, for ``philora verify``
(verify.py), and the table it writes.

A reply is identical, or diverges at a token: a near-tie when the reference's top-1 minus top-2
logit there is below the engine's threshold (a rounding may flip it), a real divergence above it;
or it runs past the reference's stop (a stop token lost on the way) or stops before it. An engine
whose replies are the base model's wherever the adapter changes the reference's ignores the
adapter. Each failure is one line naming the engine and the prompt.

Tool calls (models with a tool-call format): each engine's calls, read by its own parser where it
has one (vLLM) or by philora's (verify.py says which), against those philora's parser reads in the
reference's reply: name and arguments, in order. A difference is a failure unless the replies
themselves part at a near-tie or at the length limit.
"""

from typing import Optional

from ..use.toolcalls import call_key, show_calls


def compare_reply(ref: dict, got: dict, base: dict, threshold: float) -> dict:
    """One engine's reply against the reference's: identical, a divergence at token ``at`` (a
    near-tie when the reference's margin there is below ``threshold``), a missing or early stop, or
    a reply cut by the length limit; ``as_base``: it is the base model's reply, not the reference's."""
    r, g = ref["tokens"], got["tokens"]
    k = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
    if r == g:
        kind = "identical"
    elif k < len(r) and k < len(g):
        kind = "near-tie" if ref["margins"][k] < threshold else "diverges"
    elif k == len(r) and ref["stopped"]:
        kind = "missing stop"
    elif k == len(g) and got["stopped"]:
        kind = "early stop"
    else:
        kind = "length"  # one side reached max_new_tokens first: no disagreement seen
    return {"kind": kind, "at": None if r == g else k,
            "margin": ref["margins"][k] if kind in ("near-tie", "diverges") else None,
            "as_base": g == base["tokens"] and base["tokens"] != r}


def _prompt_check(own, ids) -> Optional[int]:
    """None: the engine builds the reference's prompt (or is not asked); else the first differing token."""
    if own is None or own == ids:
        return None
    return next((i for i, (a, b) in enumerate(zip(own, ids)) if a != b), min(len(own), len(ids)))


def _failure(name, p, row, ref, got, threshold, decode) -> Optional[str]:
    head, k, r, g = f"{name}: prompt {p['n']} ({p['where']})", row["at"], ref["tokens"], got["tokens"]
    if row["kind"] == "diverges":
        return (f"{head}: reply token {k + 1} is {decode(g[k:k + 1])!r}, the reference's {decode(r[k:k + 1])!r} "
                f"with a top-2 margin of {row['margin']:.3f} (threshold {threshold})")
    if row["kind"] == "missing stop":
        return f"{head}: does not stop on {decode(r[-1:])!r} as the reference does; it goes on with {decode(g[k:k + 6])!r}"
    if row["kind"] == "early stop":
        return f"{head}: stops on {decode(g[-1:])!r} at reply token {len(g)}, where the reference goes on"
    return None


def compare_engine(name, prompts, ref, base, replies, eot, threshold, decode) -> dict:
    """Counts, the first divergence, failures (one line each, naming the engine and the prompt)."""
    rows, failures = [], []
    for p, r, b, g in zip(prompts, ref, base, replies):
        row = compare_reply(r, g, b, threshold)
        own = g.get("prompt")
        row["prompt"] = "not checked" if own is None else own if isinstance(own, str) else _prompt_check(own, p["ids"])
        row["stopped_on_eot"] = bool(g["stopped"] and g["tokens"] and g["tokens"][-1] == eot)
        if isinstance(row["prompt"], str) and own is not None:
            failures.append(f"{name}: prompt {p['n']} ({p['where']}): {own}")
        elif isinstance(row["prompt"], int):
            j = row["prompt"]
            failures.append(f"{name}: prompt {p['n']} ({p['where']}): its own chat template and tokenizer build "
                            f"another prompt (token {j + 1}: {decode(own[j:j + 4])!r}, trained: "
                            f"{decode(p['ids'][j:j + 4])!r})")
        line = _failure(name, p, row, r, g, threshold, decode)
        failures += [line] if line else []
        rows.append(row)
    changed = [p["n"] for p, r, b in zip(prompts, ref, base) if r["tokens"] != b["tokens"]]
    if changed and all(row["as_base"] for row, r, b in zip(rows, ref, base) if r["tokens"] != b["tokens"]):
        failures.insert(0, f"{name}: ignores the adapter: its replies are the base model's on prompts "
                           f"{', '.join(map(str, changed))}, which the adapter changes")
    first = next(({"prompt": p["n"], "token": row["at"] + 1, "margin": row["margin"], "kind": row["kind"]}
                  for p, row in zip(prompts, rows) if row["kind"] != "identical"), None)
    checked = [row for row in rows if row["prompt"] != "not checked"]
    return {"engine": name, "status": "fail" if failures else "ok", "threshold": threshold,
            "identical": sum(row["kind"] == "identical" for row in rows),
            "near_ties": sum(row["kind"] == "near-tie" for row in rows),
            "stops_on_eot": sum(row["stopped_on_eot"] for row in rows),
            "prompts_checked": len(checked), "prompts_same": sum(row["prompt"] is None for row in checked),
            "first_divergence": first, "failures": failures, "per_prompt": rows}


def compare_calls(name, prompts, ref, replies, res: dict) -> dict:
    """The engine's tool calls against the reference's, per prompt: counts and one failure line per
    prompt where they differ (not where the tokens part at a near-tie or the length limit);
    ``res`` is the engine's ``compare_engine`` result, whose failures and status this extends."""
    rows = res["per_prompt"]
    with_calls = [i for i, (r, g) in enumerate(zip(ref, replies)) if r["tool_calls"] or g["tool_calls"]]
    differ = [i for i in with_calls if [call_key(c) for c in ref[i]["tool_calls"]] !=
              [call_key(c) for c in replies[i]["tool_calls"]]]
    failures = [f"{name}: prompt {prompts[i]['n']} ({prompts[i]['where']}): tool calls read by "
                f"{replies[i]['tool_parser']}: {show_calls(replies[i]['tool_calls'])}; the reference's: "
                f"{show_calls(ref[i]['tool_calls'])}" for i in differ if rows[i]["kind"] not in ("near-tie", "length")]
    for i, row in enumerate(rows):
        row["tool_calls"] = replies[i]["tool_calls"]
    parsers = sorted({replies[i]["tool_parser"] for i in range(len(replies))})
    calls = {"parser": "; ".join(parsers), "prompts": len(with_calls), "same": len(with_calls) - len(differ)}
    out = res["failures"] + failures
    return {"tool_calls": calls, "failures": out, "status": "fail" if out else "ok"}


def _calls_cell(e: dict) -> str:
    c = e.get("tool_calls")
    return f"{c['same']}/{c['prompts']} same" if c and c["prompts"] else "–"


def _divergence(e: dict) -> str:
    d = e.get("first_divergence")
    if not d:
        return "–"
    margin = f", margin {d['margin']:.3f}" if d["margin"] is not None else ""
    return f"prompt {d['prompt']}, token {d['token']} ({d['kind']}{margin})"


def _row(e: dict, n: int) -> str:
    if e["status"] in ("skipped", "error"):
        return f"| {e['engine']} | – | – | – | – | – | – | {e.get('seconds', 0):.1f} | {e['status']}: {e['reason']} |"
    prompt = (f"{e['prompts_same']}/{e['prompts_checked']} same" if e["prompts_checked"]
              else e.get("prompt_unchecked", "tokens in"))
    verdict = "ok" if e["status"] == "ok" else f"**FAIL** ({len(e['failures'])})"
    return (f"| {e['engine']} | {e['identical']}/{n} | {_divergence(e)} | {e['near_ties']} | {e['stops_on_eot']}/{n} | "
            f"{prompt} | {_calls_cell(e)} | {e['seconds']:.1f} | {verdict} |")


def _ref_calls(result: dict) -> str:
    replies = result["reference"]["replies"]
    with_calls = sum(bool(r.get("tool_calls")) for r in replies)
    return f"{with_calls}/{len(replies)} call" if result.get("tool_call_format") else "–"


def markdown(result: dict) -> str:
    n, eot, ref = len(result["prompts"]), result["end_of_turn"], result["reference"]
    eot_text = f"`{eot['token']}` (id {eot['id']})" if eot["id"] is not None else "none found in the chat template"
    lines = ["# philora verify", "",
             f"Run `{result['run']}`: {n} held-out prompts, greedy, up to {result['max_new_tokens']} new tokens, "
             f"token ids compared with the reference (philora's base + adapter in transformers, {result['dtype']}). "
             f"End of turn: {eot_text}. The adapter changes the reference's reply on {result['adapter_changes']}/{n} "
             f"prompts (the base row).", "",
             "| engine | identical replies | first divergence | near-ties | stopped on end of turn | prompt | tool calls "
             "| time (s) | verdict |",
             "|---|---:|---|---:|---:|---|---|---:|---|",
             f"| reference | – | – | – | {ref['stops_on_eot']}/{n} | – | {_ref_calls(result)} | {ref['seconds']:.1f} | "
             f"reference |",
             f"| base (adapter off) | {result['base']['identical']}/{n} | {_divergence(result['base'])} | – | "
             f"{result['base']['stops_on_eot']}/{n} | – | – | – | differs on {result['adapter_changes']}/{n} |"]
    lines += [_row(e, n) for e in result["engines"]]
    if result.get("tool_call_format"):
        lines += ["", f"Tool calls (`{result['tool_call_format']}` format): compared by name and arguments with "
                      f"those philora's parser reads in the reference's replies; read by"]
        lines += [f"- {e['engine']}: {e['tool_calls']['parser']}" for e in result["engines"] if e.get("tool_calls")]
    failures = [f"{e['engine']}: failed: {e['reason']}" for e in result["engines"] if e["status"] == "error"]
    failures += [f for e in result["engines"] for f in e.get("failures", [])]
    lines += ["", f"**{'OK' if result['ok'] else 'FAILED'}**" + (": every engine that ran agrees with the reference."
                                                                   if result["ok"] else ":"), ""]
    lines += [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"
