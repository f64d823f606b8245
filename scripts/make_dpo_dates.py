"""Write the DPO quickstart data: the dates task (scripts/make_dates.py) as preference pairs.

Each row is the SFT row's prompt with its ISO 8601 answer as ``chosen`` and a realistic mistake as ``rejected``:

    swap      day and month swapped          "May 4, 1999"  -> 1999-04-05  (wherever both read as a month)
    century   the right date, wrong century  "9 Jun 1961"   -> 2061-06-09
    extra     the right date with extra text "3 Mar 2021"   -> "2021-03-03 (a Wednesday)", "The date is 2021-03-03."

The prompts and dates are exactly those of configs/data/dates_{train,eval}.jsonl (the same seeded draw as
make_dates.py), so an SFT-then-DPO run never sees an eval date, and ``mistake`` names each row's kind (extra
fields are ignored by the reader) for accuracy per kind. Deterministic: the mistakes come from their own
seeded generator.

    python scripts/make_dpo_dates.py --out configs/data --train 2000 --eval 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dates import draw_dates, make_rows  # noqa: E402  (the SFT task: same prompts, same dates)

KINDS = ("swap", "century", "extra")
EXTRA = (
    "{iso} ({weekday})",
    "The date is {iso}.",
    "{iso}T00:00:00",
    "ISO 8601: {iso}",
    "{iso} is the date in ISO 8601 format.",
    "Sure! {iso}",
)


def rejected_answer(date: dt.date, rng: random.Random) -> tuple[str, str]:
    """(kind, a wrong answer for ``date``): day and month swapped wherever that still reads as another date
    (day <= 12, day != month: about a third of the dates), else the wrong century or the right date with extra
    text, at random — roughly a third of the pairs each."""
    kind = "swap" if date.day <= 12 and date.day != date.month else rng.choice(KINDS[1:])
    if kind == "swap":
        return kind, f"{date.year:04d}-{date.day:02d}-{date.month:02d}"
    if kind == "century":
        year = date.year + 100 if date.year < 2000 else date.year - 100
        return kind, f"{year:04d}-{date.month:02d}-{date.day:02d}"
    extra = rng.choice(EXTRA)
    return kind, extra.format(iso=date.isoformat(), weekday=f"a {date.strftime('%A')}")


def make_pairs(rows: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    pairs = []
    for row in rows:
        date = dt.date.fromisoformat(row["completion"])
        kind, rejected = rejected_answer(date, rng)
        assert rejected != row["completion"]
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected, "mistake": kind})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("configs/data"))
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # The draw of make_dates.main, step for step: the same dates and written forms for the same arguments.
    rng = random.Random(args.seed)
    dates = draw_dates(rng, args.train + args.eval)
    mistakes = random.Random(f"dpo-dates-{args.seed}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("train", dates[: args.train]), ("eval", dates[args.train :])):
        pairs = make_pairs(make_rows(chunk, rng), mistakes)
        path = args.out / f"dates_pref_{name}.jsonl"
        with path.open("w") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
        counts = {kind: sum(p["mistake"] == kind for p in pairs) for kind in KINDS}
        print(f"wrote {len(pairs)} pairs to {path} ({', '.join(f'{k} {v}' for k, v in counts.items())})")


if __name__ == "__main__":
    main()
