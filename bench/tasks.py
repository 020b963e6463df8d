"""Small tasks for choosing the training defaults, generated deterministically (not dates: the demo
has those). Each writes ``train.jsonl`` and ``held_out.jsonl`` in the prompt/completion shape; the
held-out split is drawn from values the training split never holds, so an answer must be computed,
not remembered, and every answer is checked by exact match.

* ``numbers``: a number written in English words, to digits.
  ``Write as digits: four thousand and twelve`` -> ``4012``
* ``reverse``: three to six words, in reverse order.
  ``Reverse the order of the words: lamp river gold`` -> ``gold river lamp``
* ``extract``: a person's name, age and city from a short sentence, as one line of JSON.
  ``Extract name, age and city as JSON: Ana Silva, 34, lives in Lyon.``
  -> ``{"name": "Ana Silva", "age": 34, "city": "Lyon"}``

    python bench/tasks.py OUT_DIR [--held-out 48]     # OUT_DIR/numbers, OUT_DIR/reverse, ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen \
fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
WORDS = "apple river stone cloud lamp garden silver window forest candle bridge tiger ocean \
pencil mirror orange violin castle meadow rocket basket thunder pillow marble harbor lemon \
feather wagon cactus falcon island ladder velvet copper saddle button planet jacket".split()
FIRST = "Ana Ben Carla David Elena Farid Grace Hugo Ines Jonas Kira Liam Mara Nadia Omar Paula \
Quentin Rosa Samir Tara Umar Vera Wen Xavier Yara Zoe Aiko Bruno Chen Dara Emil Freya Gustav \
Hana Ivan Julia Kofi Lena Mateo Nora Oskar Priya Rafael Sofia Tomas Uma Viktor Wanda".split()
LAST = "Silva Novak Tanaka Okafor Berg Costa Dubois Ferrari Garcia Haddad Ivanova Jensen Kim \
Larsen Moreau Nakamura Olsen Petrov Quinn Rossi Schmidt Torres Weber Young Zhang".split()
CITIES = "Lyon Porto Oslo Kyoto Lagos Quito Perth Bergen Graz Turin Cork Split Tartu Malmo Nantes \
Leeds Basel Ghent Lund Bilbao Krakow Aarhus Dijon Brno Gdansk Utrecht Seville Lublin".split()
SENTENCES = (
    "{name}, {age}, lives in {city}.",
    "{name} is {age} years old and lives in {city}.",
    "Meet {name} from {city}, aged {age}.",
    "At {age}, {name} moved to {city}.",
    "{city} is home to {name}, who is {age}.",
    "Our new colleague {name} ({age}) works in {city}.",
)


def words(n: int) -> str:
    """``n`` (0 to 999,999) in British English words: 4012 -> 'four thousand and twelve'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        rest = n % 100
        return ONES[n // 100] + " hundred" + (" and " + words(rest) if rest else "")
    rest = n % 1000
    joint = "" if not rest else (" and " if rest < 100 else " ")
    return words(n // 1000) + " thousand" + (joint + words(rest) if rest else "")


def numbers(rng: random.Random, n_train: int, n_held: int) -> tuple[list[dict], list[dict]]:
    values = rng.sample(range(1, 100_000), n_train + n_held)
    rows = [{"prompt": f"Write as digits: {words(v)}", "completion": str(v)} for v in values]
    return rows[n_held:], rows[:n_held]


def reverse(rng: random.Random, n_train: int, n_held: int) -> tuple[list[dict], list[dict]]:
    seen: set[tuple[str, ...]] = set()
    rows = []
    while len(rows) < n_train + n_held:
        picked = tuple(rng.sample(WORDS, rng.randint(3, 6)))
        if picked not in seen:
            seen.add(picked)
            prompt = "Reverse the order of the words: " + " ".join(picked)
            rows.append({"prompt": prompt, "completion": " ".join(reversed(picked))})
    return rows[n_held:], rows[:n_held]


def extract(rng: random.Random, n_train: int, n_held: int) -> tuple[list[dict], list[dict]]:
    # Held-out people have first names, and live in cities, that no training row mentions.
    held_first, held_cities = set(FIRST[::6]), set(CITIES[::5])

    def one(first: list[str], cities: list[str]) -> dict[str, str]:
        name = f"{rng.choice(first)} {rng.choice(LAST)}"
        age, city = rng.randint(18, 90), rng.choice(cities)
        sentence = rng.choice(SENTENCES).format(name=name, age=age, city=city)
        answer = json.dumps({"name": name, "age": age, "city": city})
        return {"prompt": f"Extract name, age and city as JSON: {sentence}", "completion": answer}

    train_first = [f for f in FIRST if f not in held_first]
    train_cities = [c for c in CITIES if c not in held_cities]
    train = [one(train_first, train_cities) for _ in range(n_train)]
    return train, [one(sorted(held_first), sorted(held_cities)) for _ in range(n_held)]


# name: (generator, training rows, new tokens enough for every answer and the end of turn)
TASKS = {"numbers": (numbers, 300, 8), "reverse": (reverse, 300, 12), "extract": (extract, 400, 30)}


def write(out_dir: str | Path, name: str, n_held: int = 48, seed: int = 0) -> Path:
    """Write task ``name``'s two splits into ``out_dir/name``; the same arguments, the same rows."""
    make, n_train, _ = TASKS[name]
    train, held_out = make(random.Random(seed), n_train, n_held)
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    for file, rows in (("train.jsonl", train), ("held_out.jsonl", held_out)):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (out / file).write_text(text, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--held-out", type=int, default=48)
    args = parser.parse_args(argv)
    for name in TASKS:
        print(f"wrote {write(args.out_dir, name, args.held_out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
