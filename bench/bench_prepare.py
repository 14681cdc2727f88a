"""Benchmark pipelines/prepare.py at corpus scale: throughput, and what the driver costs.

Corpora: tinyshakespeare copied x1, x16, x64 as separate files, and x4 cut into 10,000 small
files (one document each, in 100 directories). Every run is given the same byte-level BPE (8192,
trained on tinyshakespeare; --vocab_path), so its first pass reads only a 64 KiB probe; one more
run at x16 trains its own BPE, to show what the tokenizer's sample pass costs.

Each measurement runs in a fresh driver process with its own local Ray cluster (one CPU per
core) and a warm-up prepare first (worker start-up is not counted); best of --repeats:
  MB/s         MB of source text per second of prepare()'s wall time (Ray start-up excluded)
  driver RSS   peak resident memory of the driver process, sampled every 20 ms
  driver CPU   CPU-seconds of the driver process (its sampling thread excluded), as a share of
               the whole job's: the driver and every process under it (GCS, raylet, workers,
               Ray Data's actors; one that exits keeps the CPU it had when last sampled)
  CPU rate     MB of text per CPU-second of the whole job: time per GB on N nodes is
               projected from it and from the driver's CPU per work item
Side by side: the same measurements of the prepare before issue 28 ("tasks": a window of
plain Ray tasks, one per work item; git commit OLD, run from a copy of that commit's code) and
a one-thread tiktoken baseline (read + encode, no Ray, no writing); "Ray Data" is this
checkout's pipeline.

Targets (issues 14 and 28): Ray Data's MB/s >= 0.9 x the tasks version's at every size; the
driver's peak RSS at x64 <= 1.2 x at x1, and at most ~1 KB more per input file at 10,000 files;
its CPU share at x64 <= 5 %.

Run:
    .venv/bin/python bench/bench_prepare.py                 # ~8 min on 2 cores
    .venv/bin/python bench/bench_prepare.py --scales 1 16 --repeats 1 --no-old
It prints a markdown table and writes JSON (default bench/results/bench_prepare.json).
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
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OLD = "8a2aac2"  # the last commit of the Ray tasks version (issue 28 made it Ray Data)
SMALL_FILES = 10_000
NODE_CPUS = 16  # the projection's node size

DRIVER = r"""
import json, os, resource, sys, threading, time
args = json.loads(sys.argv[1])
import ray  # first: it puts its bundled psutil on sys.path
import ray.data
import psutil

ray.init(num_cpus=args["cpus"], include_dashboard=False, logging_level="warning")
ray.data.DataContext.get_current().enable_progress_bars = False
import pipelines.prepare
from pipelines.prepare import PrepareConfig, prepare

if args.get("item_bytes"):  # the driver's cost per work item, measured with many small ones
    pipelines.text.corpus.ITEM_BYTES = (args["item_bytes"], args["item_bytes"])

me = psutil.Process()


seen = {}  # pid -> its CPU-seconds when last seen: a process that exits keeps its count


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.cpu, self.running = 0, 0.0, True

    def run(self):
        n = 0
        while self.running:
            self.peak = max(self.peak, me.memory_info().rss)
            if n % 10 == 0:
                tree_cpu()
            n += 1
            self.cpu = time.thread_time()
            time.sleep(0.02)


def tree_cpu():
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            seen[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return sum(seen.values())


def driver_cpu(sampler):
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime - sampler.cpu


def flags(corpus, out, **extra):
    return PrepareConfig(corpus=[corpus], out=out, overwrite=True,
                         val_fraction=args["val_fraction"], **extra)


prepare(flags(args["warm"], args["out"] + "-warm", vocab_path=args["vocab"]))
sampler = Sampler()
sampler.start()
best = None
for _ in range(args["repeats"]):
    sampler.peak, c0, d0, s0 = 0, tree_cpu(), driver_cpu(sampler), sampler.cpu
    extra = {"vocab_path": args["vocab"]} if args["vocab"] else {}
    r = prepare(flags(args["corpus"], args["out"], **extra))
    r["driver_cpu_s"] = driver_cpu(sampler) - d0
    r["job_cpu_s"] = tree_cpu() - c0 - (sampler.cpu - s0)
    r["driver_peak_mb"] = sampler.peak / 2**20
    best = r if best is None or r["prepare_s"] < best["prepare_s"] else best
    best["driver_peak_mb"] = max(best["driver_peak_mb"], r["driver_peak_mb"])
print("RESULT " + json.dumps(best))
"""

BASELINE = r"""
import sys, time
import numpy as np
from gpt2core.tokenizer import Tokenizer
from pipelines.text.encoding import to_tiktoken
tok = Tokenizer.from_pretrained(sys.argv[1])
enc = to_tiktoken(tok.backend.to_str())
files = sys.argv[2:]
start = time.perf_counter()
ids = [enc.encode_to_numpy(open(f, encoding="utf-8").read(), allowed_special="all")
       for f in files]
stream = np.concatenate([a for doc in ids for a in (doc.astype(np.uint16), [tok.eos_id])])
print("RESULT", time.perf_counter() - start)
"""


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))) / 2**20
    return {"cpu": model, "cores": os.cpu_count(), "ram_gb": round(mem, 1),
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def drive(code: Path, args: dict) -> dict:
    """One fresh driver process running `code`'s prepare; its RESULT line."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], cwd=code, env=env,
                         capture_output=True, text=True, timeout=1800)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"prepare ({code}) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def corpora(text: Path, scales: list[int], work: Path) -> dict[str, Path]:
    found = {}
    for k in scales:
        found[f"x{k}"] = work / f"x{k}"
        found[f"x{k}"].mkdir()
        for i in range(k):
            shutil.copy(text, found[f"x{k}"] / f"copy{i:03d}.txt")
    lines = text.read_text(encoding="utf-8").splitlines(keepends=True) * 4
    per = len(lines) / SMALL_FILES
    small = found[f"{SMALL_FILES:,} files"] = work / "small"
    for i in range(SMALL_FILES):
        d = small / f"{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:05d}.txt").write_text("".join(lines[round(i * per):round((i + 1) * per)]),
                                        encoding="utf-8")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="the x1 corpus")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--val_fraction", type=float, default=0.05,
                        help="0.05: a chunk of tinyshakespeare hashes below it (0.023), so "
                        "the copies corpora never take the lowest-hash fallback, which "
                        "prepare pays for by tokenizing again every item holding it")
    parser.add_argument("--no-old", dest="old", action="store_false",
                        help="skip the tasks version (commit OLD)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/bench_prepare.json")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"{args.text} is missing; pass --text with a text file.")
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        results = run(args, info["cores"], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_avg_after"] = os.getloadavg()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": info,
              "old_commit": subprocess.run(["git", "rev-parse", "--short", OLD], cwd=ROOT,
                                           capture_output=True, text=True).stdout.strip(),
              **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.json}")


def run(args, cores: int, work: Path) -> dict:
    from gpt2core.tokenizer import Tokenizer

    Tokenizer.train([args.text], vocab_size=8192).save(work / "tok")
    found = corpora(args.text, args.scales, work)
    codes = {"new": ROOT}
    if args.old:
        codes["old"] = work / "old"
        codes["old"].mkdir()
        archive = subprocess.run(["git", "archive", OLD, "pipelines", "gpt2core"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(codes["old"])], input=archive, check=True)
    rows = {}
    for name, corpus in found.items():
        files = sorted(p for p in corpus.rglob("*.txt"))
        mb = sum(f.stat().st_size for f in files) / 1e6
        rows[name] = row = {"mb": mb, "files": len(files)}
        base = subprocess.run([sys.executable, "-c", BASELINE, str(work / "tok"), *map(str, files)],
                              cwd=ROOT, capture_output=True, text=True, check=True)
        row["tiktoken/1"] = {"mb_s": mb / float(base.stdout.split("RESULT")[-1])}
        for variant, code in codes.items():
            r = drive(code, {"cpus": cores, "corpus": str(corpus), "out": str(work / "out"),
                             "warm": str(found[next(iter(found))]), "vocab": str(work / "tok"),
                             "repeats": args.repeats, "val_fraction": args.val_fraction})
            row[variant] = {**r, "mb_s": mb / r["prepare_s"],
                            "driver_share": r["driver_cpu_s"] / max(1e-9, r["job_cpu_s"])}
        print(f"{name}: done", flush=True)
    small = found[f"{SMALL_FILES:,} files"]
    many = drive(ROOT, {"cpus": cores, "corpus": str(small), "out": str(work / "out"),
                        "warm": str(found[next(iter(found))]), "vocab": str(work / "tok"),
                        "repeats": args.repeats, "val_fraction": args.val_fraction,
                        "item_bytes": 8 << 10})
    trained = None
    if "x16" in found:  # the first pass a trained tokenizer needs
        trained = drive(ROOT, {"cpus": cores, "corpus": str(found["x16"]),
                               "out": str(work / "out"), "warm": str(found["x16"]),
                               "vocab": None, "repeats": 1, "val_fraction": args.val_fraction})
    return {"scales": rows, "trained_x16": trained, "small_items": many}


def markdown(report: dict) -> str:
    m, scales = report["machine"], report["scales"]
    first = next(iter(scales.values()))
    nan = {"mb_s": float("nan"), "driver_peak_mb": float("nan"), "driver_share": float("nan"),
           "job_cpu_s": float("nan")}
    per_file = scales[f"{SMALL_FILES:,} files"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}; "
        f"load average {m['load_avg'][0]:.2f} before, {m['load_avg_after'][0]:.2f} after "
        f"({report['date']}). Tasks: the prepare of commit {report['old_commit']}.", "",
        "| corpus | MB | files | MB/s Ray Data | MB/s tasks | Ray Data / tasks (target >= 0.9) "
        "| tiktoken 1 thread | work items | driver peak RSS Ray Data (x first) | tasks | driver "
        "CPU share Ray Data | tasks | MB per job CPU-second Ray Data | tasks | padding (train) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in scales.items():
        new, old = r["new"], r.get("old", nan)
        lines.append(
            f"| {name} | {r['mb']:.1f} | {r['files']:,} | {new['mb_s']:.2f} | "
            f"{old['mb_s']:.2f} | {new['mb_s'] / old['mb_s']:.2f} | "
            f"{r['tiktoken/1']['mb_s']:.2f} | {new['items']} | "
            f"{new['driver_peak_mb']:.0f} MB "
            f"({new['driver_peak_mb'] / first['new']['driver_peak_mb']:.2f}x) | "
            f"{old['driver_peak_mb']:.0f} MB | {100 * new['driver_share']:.1f} % | "
            f"{100 * old['driver_share']:.1f} % | {r['mb'] / new['job_cpu_s']:.2f} | "
            f"{r['mb'] / old['job_cpu_s']:.2f} | {new['padding']['train']:,} tokens |")
    for variant, label in (("new", "Ray Data"), ("old", "tasks")):
        if variant in per_file:
            extra = per_file[variant]["driver_peak_mb"] - first[variant]["driver_peak_mb"]
            lines.append(f"\nDriver memory per input file ({label}): peak RSS at "
                         f"{SMALL_FILES:,} files minus at the first corpus, "
                         f"{extra * 2**20 / SMALL_FILES / 1024:.2f} KB a file.")
    big = max(scales.values(), key=lambda r: r["mb"] if r["files"] < 1000 else 0)["new"]
    rate = big["bytes"] / 1e6 / big["job_cpu_s"]  # every process's CPU, per MB
    many, one = report["small_items"], scales[f"{SMALL_FILES:,} files"]["new"]
    per_item = (many["driver_cpu_s"] - one["driver_cpu_s"]) / (many["items"] - one["items"])
    item_mb = 8 * 2**20 / 1e6  # at scale every item is ITEM_BYTES[1]
    lines += ["", f"Projection: {rate:.2f} MB of text per CPU-second of the whole job (the "
              f"largest copy corpus); the driver's CPU per work item, from the {SMALL_FILES:,} "
              f"files in {many['items']} items of 8 KiB against {one['items']}: "
              f"{1000 * per_item:.1f} ms, so with items of {item_mb:.1f} MB it could hand out "
              f"{item_mb / per_item:,.0f} MB/s on its own. Time per GB on N nodes of 16 CPUs, "
              "assuming storage keeps up:", "",
              "| nodes x 16 CPUs | s per GB (tasks) | s per GB (driver bound) |", "|---|---|---|"]
    for n in (1, 4, 16, 64):
        lines.append(f"| {n} | {1000 / (rate * n * NODE_CPUS):.2f} | "
                     f"{1000 / item_mb * per_item:.2f} |")
    t = report.get("trained_x16")
    if t:
        lines += ["", f"x16 with a trained 8192-token BPE: sample pass {t['sample_s']:.2f} s "
                  f"(reads min(--tokenizer_sample_bytes, corpus) spread over the items), BPE "
                  f"training {t['tokenizer_s']:.2f} s, tokenize {t['tokenize_s']:.2f} s; "
                  f"{t['bytes'] / 1e6 / t['prepare_s']:.2f} MB/s overall."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
