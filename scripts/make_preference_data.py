"""The shipped preference set (``data.train: sample-preference``), made from the shipped chat data.

Why: the preference objectives (DPO, ORPO, SimPO) need a small, offline pair set with a rule a
model can learn in minutes on a CPU, so that a run shows held-out preference accuracy rising from
chance. The rule: the chosen reply is the sample conversation's own last reply written as
``Answer: <reply>``; the rejected one is the same reply without that form (as is, in capitals,
with a chatty opener or a chatty closer). Nothing but the form differs, so what is learned is the
form, and it carries over to held-out prompts.

    python scripts/make_preference_data.py    # writes src/philora/data/preference_{train,eval}.jsonl

Records come in TRL's three forms, to exercise them all: explicit prompt as messages (most; some
with a system message or two turns), plain text (single-turn prompts), and implicit prompt (two
whole conversations). The eval file comes from sample_eval.jsonl, so its prompts are not in train.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "philora" / "data"
SEED = 2024
REJECTED_STYLES = (lambda c: c, lambda c: c.upper(), lambda c: f"Sure thing! {c}", lambda c: f"{c} Hope that helps!")


def pair(messages, rng):
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt, reply = messages[:last], messages[last]["content"]
    chosen, rejected = f"Answer: {reply}", rng.choice(REJECTED_STYLES)(reply)
    form = rng.random()
    if form < 0.2 and len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"prompt": prompt[0]["content"], "chosen": chosen, "rejected": rejected}
    if form < 0.4:
        return {"chosen": prompt + [{"role": "assistant", "content": chosen}],
                "rejected": prompt + [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main():
    rng = random.Random(SEED)
    for src, dst in (("sample_train.jsonl", "preference_train.jsonl"), ("sample_eval.jsonl", "preference_eval.jsonl")):
        lines = (DATA_DIR / src).read_text(encoding="utf-8").splitlines()
        records = [pair(json.loads(line)["messages"], rng) for line in lines if line.strip()]
        (DATA_DIR / dst).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{dst}: {len(records)} pairs")


if __name__ == "__main__":
    main()
