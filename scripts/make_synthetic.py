"""Write a synthetic prompt/completion JSONL file: N rows of roughly T tokens each, for data benchmarks.

Each row is ``{"prompt": ..., "completion": ...}``: sentences of words from a fixed vocabulary of common
English words, the prompt about 60% of the row's tokens and the completion the rest; row lengths vary
by up to +-10% around T. T counts the text's own tokens under the SmolLM2 tokenizer (a chat template
adds its own on top): CHARS_PER_TOKEN below was measured on this vocabulary with that tokenizer.
Deterministic from the seed; 1M rows x 200 tokens (1.1 GiB) take ~7 s on a 2-core CPU.

The text is cut from one long seeded stream of words at seeded offsets, so every row differs but
nothing is drawn word by word in Python (that would take minutes at 1M rows). Only lowercase ASCII
letters, spaces and periods, so lines are written without a JSON encoder (and stay valid JSON).

    python scripts/make_synthetic.py --rows 100000 --tokens 200 --seed 0 /tmp/synthetic-100k.jsonl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

VOCABULARY = """
the of and to in is was for on are with as his they be at one have this from or had by word but what some
we can out other were all there when up use your how said an each she which do their time if will way about
many then them write would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good me give our
under name very through just form sentence great think say help low line differ turn cause much mean before
move right boy old too same tell does set three want air well also play small end put home read hand port
large spell add even land here must big high such follow act why ask men change went light kind off need
house picture try us again animal point mother world near build self earth father head stand own page should
country found answer school grow study still learn plant cover food sun four between state keep eye never
last let thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper group
always music those both mark often letter until mile river car feet care second book carry took science eat
room friend began idea fish mountain stop once base hear horse cut sure watch color face wood main enough
plain girl usual young ready above ever red list though feel talk bird soon body dog family direct pose
leave song measure door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel less
morning ten simple several vowel toward war lay against pattern slow center love person money serve appear
road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine
note wait plan figure star box noun field rest correct able pound done beauty drive stood contain front teach
week final gave green quick develop ocean warm free minute strong special mind behind clear tail produce fact
street inch multiply nothing course stay wheel full force blue object decide surface deep moon island foot
system busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game
shape equate miss brought heat snow tire bring yes distant fill east paint language among grand ball yet wave
drop heart present heavy dance engine position arm wide sail material size vary settle speak weight general
ice matter circle pair include divide syllable felt perhaps pick sudden count square reason length represent
art subject region energy hunt probable bed brother egg ride cell believe fraction forest sit race window
store summer train sleep prove lone exercise wall catch mount wish sky board joy winter sat written wild
instrument kept glass grass cow job edge sign visit past soft fun bright gas weather month million bear
finish happy hope flower clothe strange gone jump baby eight village meet root buy raise solve metal whether
push seven paragraph third shall held hair describe cook floor either result burn hill safe cat century
consider type law bit coast copy phrase silent tall sand soil roll temperature finger industry value fight
lie beat excite natural view sense ear else quite broke case middle kill son lake moment scale loud spring
observe child straight consonant nation dictionary milk speed method organ pay age section dress cloud
surprise quiet stone tiny climb cool design poor lot experiment bottom key iron single stick flat twenty skin
smile crease hole trade melody trip office receive row mouth exact symbol die least trouble shout except wrote
seed tone join suggest clean break lady yard rise bad blow oil blood touch grew cent mix team wire cost lost
brown wear garden equal sent choose fell fit flow fair bank collect save control decimal gentle woman captain
practice separate difficult doctor please protect noon whose locate ring character insect caught period
indicate radio spoke atom human history effect electric expect crop modern element hit student corner party
supply bone rail imagine provide agree thus capital chair danger fruit rich thick soldier process operate
guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem string bell depend meat rub
tube famous dollar stream fear sight thin triangle planet hurry chief colony clock mine tie enter major fresh
search send yellow gun allow print dead spot desert suit current lift rose continue block chart hat sell
success company subtract event particular deal swim term opposite wife shoe shoulder spread arrange camp
invent cotton born determine quart nine truck noise level chance gather shop stretch throw shine property
column molecule select wrong gray repeat require broad prepare salt nose plural anger claim continent oxygen
sugar death pretty skill women season solution magnet silver thank branch match suffix especially fig afraid
huge sister steel discuss forward similar guide experience score apple bought led pitch coat mass card band
rope slip win dream evening condition feed tool total basic smell valley nor double seat arrive master track
parent shore division sheet substance favor connect post spend chord fat glad original share station dad
bread charge proper bar offer segment slave duck instant market degree populate chick dear enemy reply drink
occur support speech nature range steam motion path liquid log meant quotient teeth shell neck
""".split()
CHARS_PER_TOKEN = 5.46  # SmolLM2 tokenizer on this vocabulary's text: measured (common words are mostly one token)
PROMPT_SHARE = 0.6
JITTER = 0.1
CHUNK = 20_000  # rows built and written at a time


def word_stream(words: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """``words`` seeded words as one string of sentences, and the char offset where each word starts."""
    vocab = np.array(VOCABULARY, dtype=object)
    picked = vocab[rng.integers(0, len(VOCABULARY), words)]
    # Sentences of 6-19 words: the last word of each gets a period.
    ends = np.cumsum(rng.integers(6, 20, words // 6 + 1))
    ends = ends[ends < words]
    picked[ends] = picked[ends] + np.array(".", dtype=object)
    lengths = np.fromiter((len(w) for w in picked), dtype=np.int64, count=words) + 1  # + the space after it
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return " ".join(picked.tolist()), starts


def write(path: Path, rows: int, tokens: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    mean_word = sum(len(w) + 1 for w in VOCABULARY) / len(VOCABULARY)
    words_per_token = CHARS_PER_TOKEN / mean_word
    # Words per row, then the prompt's share of them; the pool is long enough that rows rarely repeat.
    row_words = np.maximum(2, np.rint(tokens * words_per_token * rng.uniform(1 - JITTER, 1 + JITTER, rows)))
    row_words = row_words.astype(np.int64)
    prompt_words = np.maximum(1, np.rint(row_words * PROMPT_SHARE)).astype(np.int64)
    pool_words = max(int(row_words.max()) * 4, min(int(row_words.sum()), 4_000_000))
    text, starts = word_stream(pool_words + 1, rng)
    first = rng.integers(0, pool_words - row_words + 1)
    cut = first + prompt_words
    last = first + row_words
    a, b, c = starts[first].tolist(), (starts[cut] - 1).tolist(), (starts[last] - 1).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for begin in range(0, rows, CHUNK):
            f.write("".join(
                f'{{"prompt": "{text[a[i]:b[i]].capitalize()}", "completion": "{text[b[i] + 1:c[i]]}"}}\n'
                for i in range(begin, min(begin + CHUNK, rows))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--tokens", type=int, default=200, help="mean tokens of text per row (prompt + completion)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rows < 1 or args.tokens < 2:
        parser.error("--rows must be >= 1 and --tokens >= 2")
    start = time.perf_counter()
    write(args.out, args.rows, args.tokens, args.seed)
    size = args.out.stat().st_size
    print(f"{args.out}: {args.rows:,} rows, ~{args.tokens} tokens each, {size / 2**20:,.0f} MiB "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
