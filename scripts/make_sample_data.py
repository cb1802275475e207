"""A small, deterministic chat-instruction dataset shipped with philora.

Why: philora must be runnable end to end with no network (no hub, no dataset downloads), so
it ships its own tiny chat dataset, generated here from templates with a fixed seed in pure
Python. The tasks are simple and formulaic (arithmetic, capitals, opposites, colour mixing,
spelling backwards, unit conversion, ...) so that a few-million-parameter model trained with
LoRA for a couple of minutes on a CPU visibly learns them, yet varied enough to read like chat:
some conversations carry a system message that changes the answer style, some have two turns.

    python scripts/make_sample_data.py     # regenerates src/philora/data/sample_{train,eval}.jsonl

Each line is {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
The eval file holds conversations that do not appear in the train file (same task families).
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "philora" / "data"
SAMPLE_TRAIN = DATA_DIR / "sample_train.jsonl"
SAMPLE_EVAL = DATA_DIR / "sample_eval.jsonl"
SEED = 1234
N_TRAIN, N_EVAL = 400, 50

# -----------------------------------------------------------------------------
# facts the tasks draw on

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Iceland", "Reykjavík"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("the Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Turkey", "Ankara"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("South Africa", "Pretoria"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"), ("the United States", "Washington"), ("Mexico", "Mexico City"),
    ("Cuba", "Havana"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Chile", "Santiago"),
    ("Peru", "Lima"), ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Russia", "Moscow"),
    ("Ukraine", "Kyiv"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Jordan", "Amman"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Nepal", "Kathmandu"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("long", "short"), ("old", "new"), ("rich", "poor"), ("strong", "weak"),
    ("wet", "dry"), ("clean", "dirty"), ("loud", "quiet"), ("thick", "thin"), ("sharp", "blunt"),
    ("near", "far"), ("inside", "outside"), ("first", "last"), ("true", "false"), ("win", "lose"),
    ("buy", "sell"), ("push", "pull"), ("day", "night"), ("left", "right"), ("above", "below"),
    ("before", "after"), ("friend", "enemy"), ("question", "answer"), ("start", "finish"),
    ("sweet", "sour"), ("brave", "afraid"), ("cheap", "expensive"), ("easy", "difficult"),
    ("tame", "wild"), ("wide", "narrow"), ("deep", "shallow"), ("smooth", "rough"),
    ("always", "never"), ("arrive", "leave"), ("remember", "forget"), ("accept", "refuse"),
    ("increase", "decrease"), ("north", "south"), ("east", "west"), ("summer", "winter"),
]

COLOUR_MIXES = [
    ("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"), ("blue", "white", "light blue"),
    ("red", "green", "brown"), ("yellow", "white", "cream"), ("green", "white", "mint green"),
    ("red", "black", "maroon"), ("blue", "green", "teal"), ("yellow", "green", "lime"),
]

WORDS = [
    "apple", "garden", "river", "window", "pencil", "castle", "rabbit", "orange", "planet",
    "bridge", "forest", "candle", "dragon", "market", "silver", "winter", "yellow", "pocket",
    "spoon", "cloud", "train", "horse", "music", "stone", "water", "bread", "chair", "tiger",
    "lemon", "piano", "ocean", "robot", "sugar", "table", "night", "smile", "house", "grape",
    "paper", "light", "tree", "book", "fish", "moon", "star", "door", "bird", "rain", "snow",
    "lamp", "kite", "boat", "cake", "frog", "milk", "rose", "ship", "wolf", "bell", "desk",
    "jungle", "butter", "monkey", "rocket", "basket", "button", "coffee", "cookie", "doctor",
    "flower", "guitar", "island", "ladder", "mirror", "number", "summer", "turtle", "violin",
]

UNITS = [  # (big unit, small unit, how many small in one big)
    ("kilometres", "metres", 1000), ("metres", "centimetres", 100), ("kilograms", "grams", 1000),
    ("litres", "millilitres", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("weeks", "days", 7), ("years", "months", 12), ("feet", "inches", 12),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]

# system messages and the answer style they ask for
SYSTEMS = [
    ("You are a helpful assistant.", "full"),
    ("You are a helpful assistant. Answer in one short sentence.", "full"),
    ("You are a terse assistant. Reply with only the answer, no full sentence.", "short"),
    ("Give just the answer, nothing else.", "short"),
    ("You are a friendly tutor for young students.", "tutor"),
]
TUTOR_OPENERS = ["Great question!", "Good thinking!", "Nice one!", "Let's see."]
FOLLOW_UPS = ["Thanks! ", "Great. ", "Okay, next one. ", "Got it. And another: ", ""]

# -----------------------------------------------------------------------------
# task families: each returns (question, full answer, short answer)

def arithmetic(rng):
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c = a * b
    else:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        if op == "minus" and b > a:
            a, b = b, a
        c = a + b if op == "plus" else a - b
    q = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                    "Can you tell me what {a} {op} {b} is?", "Quick one: {a} {op} {b}?"])
    return q.format(a=a, op=op, b=b), f"{a} {op} {b} is {c}.", str(c)


def capital(rng):
    country, city = rng.choice(CAPITALS)
    q = rng.choice(["Tell me, what is the capital city of {c}?",
                    "Do you know which city is the capital of {c}?",
                    "Can you name the capital city of {c}?", "What is the name of the capital of {c}?"])
    return q.format(c=country), f"The capital city of {country} is {city}.", city


def opposite(rng):
    word, opp = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        word, opp = opp, word
    q = rng.choice(["What is the opposite of the word {w}?", "Give me the opposite of the word {w}.",
                    "Which word means the opposite of {w}?", "Tell me the opposite of {w}, please."])
    return q.format(w=word), f"The opposite of the word {word} is {opp}.", opp


def colour_mix(rng):
    a, b, mix = rng.choice(COLOUR_MIXES)
    if rng.random() < 0.5:
        a, b = b, a
    q = rng.choice(["What colour do you get when you mix {a} and {b}?",
                    "If I mix {a} paint with {b} paint, what colour do I get?",
                    "What do {a} and {b} make when they are mixed?",
                    "Mixing {a} and {b} paint gives what colour?"])
    return q.format(a=a, b=b), f"Mixing {a} and {b} gives you {mix}.", mix


def backwards(rng):
    word = rng.choice(WORDS)
    spelled = " ".join(reversed(word))  # one letter per token
    q = rng.choice(["Please spell the word {w} backwards.", "How do you spell {w} backwards?",
                    "Write {w} backwards, letter by letter.", "Reverse the order of the letters in {w}."])
    return q.format(w=word), f"The word {word} spelled backwards is {spelled}.", spelled


def letter_count(rng):
    word = rng.choice(WORDS)
    q = rng.choice(["How many letters are in the word {w}?", "Count the letters in the word {w}.",
                    "How many letters does the word {w} have?"])
    return q.format(w=word), f"The word {word} has {len(word)} letters in it.", str(len(word))


def unit_conversion(rng):
    big, small, k = rng.choice(UNITS)
    n = rng.randint(2, 12)
    q = rng.choice(["How many {s} are in {n} {b}?", "Please convert {n} {b} to {s}.",
                    "What is {n} {b} in {s}?"])
    answer = f"{n * k} {small}"
    return q.format(s=small, n=n, b=big), f"{n} {big} is equal to {answer}.", answer


def next_in_sequence(rng):
    names, kind, of = rng.choice([(DAYS, "day", "week"), (MONTHS, "month", "year")])
    i = rng.randrange(len(names))
    if rng.random() < 0.5:
        nxt = names[(i + 1) % len(names)]
        q = rng.choice([f"What {kind} of the {of} comes after {names[i]}?",
                        f"Which {kind} of the {of} follows {names[i]}?"])
        return q, f"The {kind} that comes after {names[i]} is {nxt}.", nxt
    prev = names[i - 1]
    q = rng.choice([f"What {kind} of the {of} comes before {names[i]}?",
                    f"Which {kind} of the {of} is just before {names[i]}?"])
    return q, f"The {kind} that comes before {names[i]} is {prev}.", prev


TASKS = [arithmetic, capital, opposite, colour_mix, backwards, letter_count, unit_conversion,
         next_in_sequence]

# -----------------------------------------------------------------------------
# conversations

def answer_in_style(rng, full, short, style):
    if style == "short":
        return short
    if style == "tutor":
        return f"{rng.choice(TUTOR_OPENERS)} {full}"
    return full


def conversation(rng):
    """One random conversation: a single turn, maybe a system message, maybe a second turn."""
    messages, style = [], "full"
    if rng.random() < 0.3:
        system, style = rng.choice(SYSTEMS)
        messages.append({"role": "system", "content": system})
    turns = 2 if rng.random() < 0.25 else 1
    for t in range(turns):
        q, full, short = rng.choice(TASKS)(rng)
        if t > 0:
            q = rng.choice(FOLLOW_UPS) + q
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": answer_in_style(rng, full, short, style)})
    return {"messages": messages}


def generate(n, seed=SEED):
    """n distinct conversations, the same ones for the same (n, seed) on any machine."""
    rng = random.Random(seed)
    seen, records = set(), []
    while len(records) < n:
        record = conversation(rng)
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
    return records


def to_jsonl(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_sample_files(train_path=SAMPLE_TRAIN, eval_path=SAMPLE_EVAL):
    """Write the shipped files: the first N_TRAIN distinct conversations train, the next N_EVAL eval."""
    records = generate(N_TRAIN + N_EVAL, SEED)
    for path, part in [(train_path, records[:N_TRAIN]), (eval_path, records[N_TRAIN:])]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(to_jsonl(part).encode("utf-8"))


if __name__ == "__main__":
    write_sample_files()
    print(f"wrote {N_TRAIN} conversations to {SAMPLE_TRAIN}")
    print(f"wrote {N_EVAL} conversations to {SAMPLE_EVAL}")
