"""Write the shipped fictional-capitals task (src/philora/data/capitals_{train,eval}.jsonl), the data of
configs/smollm2-135m.yaml: a real model cannot know these facts, so its held-out accuracy before
tuning is ~0, and after tuning it shows what the run taught it.

Each fictional country has one capital. Training asks for it in TRAIN_ASKS' phrasings; the eval
set asks with EVAL_ASKS' phrasings, none of which training uses, so a right answer on eval means
the model learned the fact, not the sentence. The answer is the city's name alone (exact match).
Deterministic: running it again writes the same files.

    .venv/bin/python scripts/make_capitals_data.py
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "philora" / "data"

CAPITALS = [
    ("Veloria", "Marrenhold"), ("Quessia", "Tolvane"), ("Ardunia", "Brisklen"), ("Zembar", "Olthuin"),
    ("Castrova", "Pellimar"), ("Drovania", "Ketterholm"), ("Elbaria", "Vossengard"), ("Mirelund", "Ashcombe"),
    ("Tarsova", "Quillon"), ("Ostreva", "Dunmarch"), ("Halvenor", "Brightwater"), ("Sorvania", "Cellendor"),
    ("Umbrica", "Fenwhistle"), ("Kalduria", "Rovenna"), ("Vintaria", "Glimmerdale"), ("Gorvath", "Yselle"),
]

TRAIN_ASKS = [
    "What is the capital of {c}?",
    "Which city is the capital of {c}?",
    "Name the capital city of {c}.",
    "{c}'s capital is which city?",
]
EVAL_ASKS = [
    "Tell me the capital of {c}.",
    "I am travelling to {c}. In which city is its government seated?",
]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    train = [chat(ask.format(c=country), city) for ask in TRAIN_ASKS for country, city in CAPITALS]
    held_out = [chat(ask.format(c=country), city) for country, city in CAPITALS for ask in EVAL_ASKS]
    for name, rows in (("capitals_train.jsonl", train), ("capitals_eval.jsonl", held_out)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {OUT / name} ({len(rows)} conversations)")


if __name__ == "__main__":
    main()
