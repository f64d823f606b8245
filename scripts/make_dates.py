"""Write the quickstart task data: written dates ("March 3, 2021", "3 Mar 2021", ...) -> ISO 8601.

A task the base SmolLM2-135M-Instruct does poorly and a small LoRA learns in a minute on a CPU.
Deterministic (fixed seed), with train and eval drawn from disjoint dates.

    python scripts/make_dates.py --out configs/data --train 2000 --eval 200
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

PROMPT = "Convert this date to ISO 8601 (YYYY-MM-DD): {date}"


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def written_forms(date: dt.date) -> list[str]:
    month, mon = date.strftime("%B"), date.strftime("%b")
    weekday = date.strftime("%A")
    day, year = date.day, date.year
    return [
        f"{month} {day}, {year}",
        f"{day} {mon} {year}",
        f"{day} {month} {year}",
        f"{mon} {day}, {year}",
        f"{month} {ordinal(day)}, {year}",
        f"the {ordinal(day)} of {month}, {year}",
        f"{weekday}, {month} {day}, {year}",
        f"{weekday} {day} {month} {year}",
        f"{mon}. {day} {year}",
        f"{year} {month} {day}",
        f"{day}-{mon}-{year}",
        f"{month.upper()} {day} {year}",
    ]


def draw_dates(rng: random.Random, count: int) -> list[dt.date]:
    """``count`` distinct dates in 1950-2049 (distinct: no eval date is trained on)."""
    start, span = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days
    return [start + dt.timedelta(days=o) for o in rng.sample(range(span + 1), count)]


def make_rows(dates: list[dt.date], rng: random.Random) -> list[dict[str, str]]:
    return [
        {"prompt": PROMPT.format(date=rng.choice(written_forms(d))), "completion": d.isoformat()}
        for d in dates
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("configs/data"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    dates = draw_dates(rng, args.train + args.eval)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("train", dates[: args.train]), ("eval", dates[args.train :])):
        path = args.out / f"dates_{name}.jsonl"
        with path.open("w") as f:
            for row in make_rows(chunk, rng):
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(chunk)} rows to {path}")


if __name__ == "__main__":
    main()
