"""What a run tells the people who serve it: the LongRoPE regime(s) it trained, and a README.

A LongRoPE model (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) computes a conversation of n tokens
with its short rotary factors when n <= ``original_max_position_embeddings`` (the switch), else
with its long ones; philora trains each conversation with the set it gets alone (rope.py).
Serving engines choose one set per deployment (vLLM from ``--max-model-len``, llama.cpp from
``n_ctx``), so a run records how many conversations it trained on each side
(``longrope.json``) and says how to serve on the same side: in the log, in the run's
``README.md`` and in ``philora adapter check``.
"""

import json
from pathlib import Path
from typing import Optional

from ..model.families import longrope_advice, longrope_switch

RECORD = "longrope.json"
README = "README.md"
MARK = "<!-- written by philora: rewritten by each run in this directory -->"


def rope_regimes(config, examples) -> Optional[dict]:
    """For a LongRoPE model: the switch, the conversations (and tokens) on each side of it, and
    the serving advice. None for other models."""
    switch = longrope_switch(config)
    if switch is None:
        return None
    counts = {"short": [0, 0], "long": [0, 0]}
    lengths = examples.lengths() if hasattr(examples, "lengths") else [len(ex["input_ids"]) for ex in examples]
    for n in (int(n) for n in lengths):  # data.Examples knows its lengths without reading rows
        side = counts["long" if n > switch else "short"]
        side[0] += 1
        side[1] += n
    (short, short_tokens), (long, long_tokens) = counts["short"], counts["long"]
    return {"original_max_position_embeddings": switch,
            "short": {"conversations": short, "tokens": short_tokens},
            "long": {"conversations": long, "tokens": long_tokens},
            "advice": longrope_advice(switch, short, long)}


def read_record(run_dir) -> Optional[dict]:
    """The run's LongRoPE record, or None (no record: not a philora run of a LongRoPE model)."""
    path = Path(run_dir) / RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("advice"), str) and all(
        isinstance(record.get(side), dict) and isinstance(record[side].get("conversations"), int)
        for side in ("short", "long"))
    return record if ok else None


def write_notes(out, base: str, record: Optional[dict]) -> None:
    """``longrope.json`` (LongRoPE models) and ``README.md`` into the run directory ``out``; a
    README.md that philora did not write is left alone."""
    out = Path(out)
    try:
        if record is not None:
            (out / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        readme = out / README
        if not readme.exists() or readme.read_text(encoding="utf-8", errors="replace").startswith(MARK):
            readme.write_text(readme_text(out, base, record), encoding="utf-8")
    except OSError as e:  # the adapter is saved: notes that cannot be written are a warning
        print(f"philora: warning: cannot write the serving notes in {out}: {e.strerror or e}")


def readme_text(out, base: str, record: Optional[dict]) -> str:
    """The run's README: how to load the adapter and serve it (on the trained LongRoPE side)."""
    lines = [MARK, f"# LoRA adapter for {base}", "",
             "Trained with philora; the adapter is in the PEFT format.", "",
             "```python", "from peft import AutoPeftModelForCausalLM",
             f'model = AutoPeftModelForCausalLM.from_pretrained("{out}")', "```", "",
             "Serve it on its base, e.g. with vLLM:", "", "```bash",
             f"vllm serve {base} --enable-lora --lora-modules adapter={out}"
             + (f" --max-model-len {record['original_max_position_embeddings']}"
                if record is not None and record["long"]["conversations"] == 0 else ""),
             "```", ""]
    if record is not None:
        lines += [record["advice"] + ".", ""]
    lines += [f"`philora adapter check {out}` lists what a serving engine would refuse or serve "
              f"differently (ranks beyond vLLM's --max-lora-rank, biases, modules the base lacks).", ""]
    return "\n".join(lines)
