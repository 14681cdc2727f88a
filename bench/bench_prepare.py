"""Benchmark pipelines/prepare.py against single-process encoding with the same tokenizer.

Corpus: tinyshakespeare repeated x1, x4, x16 (and x64, without the slow tokenizers runs) as
separate files (each file a document, cut into
64 KiB chunks as prepare cuts it). One byte-level BPE (8192, trained on tinyshakespeare) is used
by everything. Side by side, in one run:

  prepare     the Ray job (`prepare()` in-process on a local Ray cluster with one CPU per core):
              scan + tokenize + pack + write Parquet + manifest; with tiktoken in the workers
              (its default for this vocabulary) and with --no-tiktoken (tokenizers)
  baselines   one Python process, the same documents, read + encode + eos + one uint16 array
              (no packing, no writing): tokenizers `encode_batch` on one thread and on all
              cores; tiktoken on the same vocabulary (converted by pipelines/encoding.py) on one
              thread (`encode_to_numpy`) and `encode_batch` on all cores

MB/s is source text (1e6 bytes) per second of wall time. Prepare's time excludes Ray start-up,
which is stated separately: `ray.init` and the first Ray Data job of a fresh cluster (its worker
processes import Ray Data, pyarrow, ...). Peak RSS of prepare is sampled every 0.1 s over the
whole process tree (driver, raylet, GCS, workers; shared pages count once per process), and is
also given as the increase over the idle cluster; baselines report their own ru_maxrss.
Each measurement is the best of --repeats runs. The machine is shared: the table also states
the load average and the parallel speed-up two busy processes actually got ("effective cores").

Targets (issue 3): prepare MB/s at x16 >= 0.8 x cores x the best one-thread single-process
rate; prepare's peak memory at x16 <= 1.3 x at x1.

Run:
    .venv/bin/python bench/bench_prepare.py                       # ~5 min on 2 cores
    .venv/bin/python bench/bench_prepare.py --scales 1 4 --repeats 1
It prints a markdown table and writes JSON (default bench/results/bench_prepare.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BASELINE = r"""
import json, os, resource, sys, time
kind, threads, tokdir, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
files = sys.argv[5:]
os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
import numpy as np
from gpt2core.tokenizer import Tokenizer
from pipelines import corpus
from pipelines.encoding import to_tiktoken
tok = Tokenizer.from_pretrained(tokdir)
enc = to_tiktoken(tok.backend.to_str()) if kind == "tiktoken" else None
best = float("inf")
for _ in range(repeats):
    start = time.perf_counter()
    docs = [d for f in files for d in corpus.chunk_document(open(f, encoding="utf-8").read(),
                                                            64 << 10) if d.strip()]
    if enc is None:
        ids = [e.ids for e in tok.backend.encode_batch_fast(docs, add_special_tokens=False)]
    elif threads > 1:
        ids = enc.encode_batch(docs, allowed_special="all", num_threads=threads)
    else:
        ids = [enc.encode_to_numpy(d, allowed_special="all") for d in docs]
    eos = np.array([tok.eos_id], np.uint16)
    stream = np.concatenate([a for doc in ids for a in (np.asarray(doc, np.uint16), eos)])
    best = min(best, time.perf_counter() - start)
print(json.dumps({"s": best, "tokens": len(stream),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


class TreeRSS(threading.Thread):
    """Peak summed RSS of this process and all its descendants, sampled every `every` s."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        import ray  # noqa: F401, I001  (first: it puts its bundled psutil on sys.path)
        import psutil

        self.psutil, self.root, self.every = psutil, psutil.Process(), every
        self.peak, self.running = 0, True

    def now(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def reset(self) -> None:
        self.peak = self.now()


def _busy(_) -> float:
    start = time.perf_counter()
    n = 0
    for i in range(4_000_000):
        n += i
    return time.perf_counter() - start


def effective_cores(cores: int) -> float:
    """How many cores `cores` busy processes actually got: contention shows as < cores."""
    alone = min(_busy(0) for _ in range(2))
    with mp.get_context("spawn").Pool(cores) as pool:
        together = pool.map(_busy, range(cores))
    return round(sum(alone / t for t in together), 2)


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in open("/proc/meminfo")
                   if line.startswith("MemTotal"))) / 2**20
    return {"cpu": model, "cores": os.cpu_count(), "ram_gb": round(mem, 1),
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def baseline(kind: str, threads: int, tokdir: Path, files: list[Path], repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", BASELINE, kind, str(threads), str(tokdir),
                          str(repeats), *map(str, files)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="the x1 corpus")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--tokenizers_up_to", type=int, default=16,
                        help="skip the (slow) tokenizers runs above this scale")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/bench_prepare.json")
    args = parser.parse_args()
    if not args.text.is_file():
        sys.exit(f"{args.text} is missing; pass --text with a text file.")

    info = machine()
    cores = info["cores"]
    info["effective_cores"] = effective_cores(cores)
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        results = run(args, info, cores, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["load_avg_after"] = os.getloadavg()
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": info,
              **results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwrote {args.json}")


def run(args, info: dict, cores: int, work: Path) -> dict:
    from gpt2core.tokenizer import Tokenizer

    start = time.perf_counter()
    tokenizer = Tokenizer.train([args.text], vocab_size=8192)
    tokenizer.save(work / "tok")
    train_s = time.perf_counter() - start
    corpora = {}
    for k in args.scales:
        corpora[k] = work / f"x{k}"
        corpora[k].mkdir()
        for i in range(k):
            shutil.copy(args.text, corpora[k] / f"copy{i:03d}.txt")

    rows = {}
    for k, d in corpora.items():
        files = sorted(d.iterdir())
        mb = sum(f.stat().st_size for f in files) / 1e6
        row = rows[k] = {"mb": mb}
        for kind, threads in (("tokenizers", 1), ("tokenizers", cores), ("tiktoken", 1),
                              ("tiktoken", cores)):
            if kind == "tokenizers" and k > args.tokenizers_up_to:
                continue
            r = baseline(kind, threads, work / "tok", files, args.repeats)
            row[f"{kind}/{threads}"] = {"mb_s": mb / r["s"], "rss_mb": r["rss_mb"],
                                        "tokens": r["tokens"]}
        print(f"x{k}: baselines done", flush=True)

    import ray
    from ray.data import DataContext

    from pipelines.prepare import PrepareConfig, prepare

    sampler = TreeRSS()
    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="warning")
    ray_init_s = time.perf_counter() - start
    DataContext.get_current().enable_progress_bars = False
    sampler.start()
    cold = prepare(PrepareConfig(corpus=[str(corpora[args.scales[0]])], out=str(work / "cold"),
                                 vocab_path=str(work / "tok")))
    time.sleep(1.0)
    idle_mb = sampler.now() / 2**20
    for k, d in corpora.items():
        for fast in (True, False) if k <= args.tokenizers_up_to else (True,):
            best, peak = None, 0
            for _ in range(args.repeats):
                sampler.reset()
                r = prepare(PrepareConfig(corpus=[str(d)], out=str(work / f"out{k}"),
                                          vocab_path=str(work / "tok"), overwrite=True,
                                          tiktoken=fast))
                peak = max(peak, sampler.peak)
                best = r if best is None or r["prepare_s"] < best["prepare_s"] else best
            rows[k]["prepare/" + ("tiktoken" if fast else "tokenizers")] = {
                "mb_s": rows[k]["mb"] / best["prepare_s"], "peak_rss_mb": peak / 2**20,
                "over_idle_mb": peak / 2**20 - idle_mb, "encoder": best["encoder"],
                **{key: round(best[key], 3) for key in ("scan_s", "tokenize_s", "prepare_s")}}
        print(f"x{k}: prepare done", flush=True)
    sampler.running = False
    ray.shutdown()
    return {"tokenizer_train_s": train_s, "ray_init_s": ray_init_s,
            "first_ray_data_job_s": cold["prepare_s"], "idle_cluster_rss_mb": idle_mb,
            "scales": {str(k): v for k, v in rows.items()}}


def markdown(report: dict) -> str:
    m, scales = report["machine"], report["scales"]
    cores = m["cores"]

    def rate(r: dict, key: str) -> str:
        return f"{r[key]['mb_s']:.2f}" if key in r else "-"

    lines = [
        f"Machine: {m['cpu']}, {cores} cores, {m['ram_gb']} GB RAM, Python {m['python']}; "
        f"load average {m['load_avg'][0]:.2f} before, {m['load_avg_after'][0]:.2f} after; two "
        f"busy processes got {m['effective_cores']} cores' worth ({report['date']}).",
        f"Ray start-up (not in prepare's MB/s): ray.init {report['ray_init_s']:.1f} s; first "
        f"Ray Data job of the fresh cluster (x{next(iter(scales))}, worker imports included) "
        f"{report['first_ray_data_job_s']:.1f} s. Tokenizer training (once, shared): "
        f"{report['tokenizer_train_s']:.1f} s.",
        "",
        "MB/s of source text | MB | prepare, tiktoken | prepare, tokenizers | tiktoken 1 thread "
        f"| tiktoken {cores} threads | tokenizers 1 thread | tokenizers {cores} threads | "
        f"prepare / best 1-thread (target {0.8 * cores:.1f}x) | prepare / same encoder, "
        "1 thread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in scales.items():
        best1 = max(r[key]["mb_s"] for key in ("tiktoken/1", "tokenizers/1") if key in r)
        p = r["prepare/tiktoken"]["mb_s"]
        same = [f"{p / r['tiktoken/1']['mb_s']:.2f}x tiktoken"]
        if "prepare/tokenizers" in r:
            same.append(f"{r['prepare/tokenizers']['mb_s'] / r['tokenizers/1']['mb_s']:.2f}x "
                        "tokenizers")
        lines.append(
            f"| x{k} | {r['mb']:.1f} | {p:.2f} | {rate(r, 'prepare/tokenizers')} | "
            f"{rate(r, 'tiktoken/1')} | {rate(r, f'tiktoken/{cores}')} | "
            f"{rate(r, 'tokenizers/1')} | {rate(r, f'tokenizers/{cores}')} | {p / best1:.2f}x | "
            f"{', '.join(same)} |")
    first = next(iter(scales.values()))["prepare/tiktoken"]
    lines += ["", "Peak RSS | prepare, all processes (target at x16 <= 1.3x x1) | over the idle "
              f"cluster ({report['idle_cluster_rss_mb']:.0f} MB) | prepare: scan / tokenize "
              "| tiktoken 1 thread | tokenizers 1 thread |", "|---|---|---|---|---|---|"]
    for k, r in scales.items():
        p = r["prepare/tiktoken"]
        hf = f"{r['tokenizers/1']['rss_mb']:.0f} MB" if "tokenizers/1" in r else "-"
        lines.append(
            f"| x{k} | {p['peak_rss_mb']:.0f} MB ({p['peak_rss_mb'] / first['peak_rss_mb']:.2f}x"
            f" x1) | {p['over_idle_mb']:.0f} MB | {p['scan_s']:.2f} s / {p['tokenize_s']:.2f} s"
            f" | {r['tiktoken/1']['rss_mb']:.0f} MB | {hf} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
