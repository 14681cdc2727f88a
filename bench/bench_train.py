"""Benchmark pipelines/train.py: Ray Train's overhead, and a 120-second Shakespeare race.

1. Throughput, tokens/s, one model (4 layers, 4 heads, 128 dims, context 64, batch 12, AdamW,
   dropout 0) on the same dataset dir (tinyshakespeare, seq_len 64, a BPE of --vocab_size):
   `python pipelines/train.py --data DIR ...` (Ray Train, 1 worker, all CPUs; its own Ray
   cluster per run) against gpt2core's loop in this process (TrainState.create, rows_to_batch,
   state.step over pipelines.common.dataset.read_split's rows, torch.set_num_threads(all CPUs)).
   Ray Train's number is its own metric train/tokens_per_sec (rank 0, per window of
   --window steps, eval excluded) read from the run's model/metrics.jsonl; ours is timed the
   same way. The first --skip windows of each run are warm-up and dropped. Runs alternate
   (Ray, ours, Ray, ours, ...) so drifting load hits both; a round's ratio is the median
   window of its Ray run over that of its loop run, and the headline is the median round.
   Target: Ray Train / ours >= 0.95.
2. The race: one `python pipelines/train.py --train_corpus TEXT --data <tmp> <RACE flags>`,
   timed from process start to exit (prepare, Ray start-up, training, final eval, export, the
   printed sample), must finish within 120 s; we report its eval/bpb (validation bits per
   byte, val split = prepare's default val_fraction 0.01). Target: <= 2.45 bpb (a well-known
   CPU baseline, nanoGPT's shakespeare_char on CPU, reaches 2.72 in that time here).

Run (about 7 min on 2 cores; a quiet machine please, the numbers are wall-clock):
    .venv/bin/python bench/bench_train.py
    .venv/bin/python bench/bench_train.py --only race --race total_steps=900 dims=192
It prints a table and writes JSON (default bench/results/train.json) naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from machine import machine_info  # noqa: E402  (bench/machine.py, beside this file)

TEXT = "/work/shared/data/tinyshakespeare.txt"
TARGETS = {"ratio": 0.95, "race_bpb": 2.45, "race_seconds": 120.0}
SHAPE = {"layers": 4, "heads": 4, "dims": 128, "seq_len": 64, "batch_train": 12}
# The race entry: train.py flags (chosen with measured tokens/s; see docs/benchmarks.md).
RACE = {"vocab_size": 2048, "seq_len": 64, "layers": 2, "heads": 4, "dims": 128,
        "batch_train": 16, "base_lr": 4e-3, "min_lr": 3e-4, "warmup_steps": 50,
        "total_steps": 500, "eval_steps": 500, "save_steps": 500, "log_steps": 100,
        "dropout": 0.0, "wd_rate": 0.1}


def flags(d: dict) -> list[str]:
    return [s for k, v in d.items() for s in (f"--{k}", str(v))]


def load() -> str:
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run(script: str, args: list[str], tmp: Path,
        watch=None) -> tuple[float, list[tuple[float, str]]]:
    """`python pipelines/<script> args` in `tmp` (MLflow store there too): (seconds, lines
    of output with the second each appeared). `watch(line)` sees each line as it comes."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    start, lines = time.perf_counter(), []
    with subprocess.Popen([sys.executable, str(ROOT / "pipelines" / script), *args], cwd=tmp,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as p:
        for line in p.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
            if watch:
                watch(line)
    seconds = time.perf_counter() - start
    if p.returncode:
        tail = "\n".join(line for _, line in lines[-60:])
        sys.exit(f"{script} {' '.join(args)} failed ({p.returncode}):\n{tail}")
    return seconds, lines


def cpu_seconds() -> dict[str, tuple[str, float]]:
    """pid -> (process title, CPU seconds used so far) for every process here (Linux /proc)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except (OSError, UnicodeDecodeError):
            continue
        # Ray names its workers "ray::Actor"; for python, the script; kernel threads have none
        args = [a for a in argv[1:] if a and not a.startswith("-")]
        title = (Path(args[0]).name if Path(argv[0]).name.startswith("python") and args
                 else Path(argv[0].strip()).name if argv[0].startswith("/")
                 else argv[0].strip()) or "[kernel]"
        fields = stat.rsplit(")", 1)[1].split()  # utime and stime are fields 14 and 15
        out[pid] = (title, (int(fields[11]) + int(fields[12])) / tick)
    return out


def cores_used(before: dict, after: dict, seconds: float) -> dict:
    """Where the machine's CPU went between two cpu_seconds() snapshots: the Ray Train worker,
    and every other process (by title, busiest first)."""
    used: dict[str, float] = {}
    for pid, (title, cpu) in after.items():
        if pid in before and pid != str(os.getpid()):
            used[title] = used.get(title, 0.0) + (cpu - before[pid][1]) / seconds
    worker = sum(c for t, c in used.items() if t.startswith("ray::RayTrainWorker"))
    others = sorted(((t[:60], round(c, 3)) for t, c in used.items()
                     if not t.startswith("ray::RayTrainWorker") and c > 0), key=lambda x: -x[1])
    return {"worker": worker, "everything_else": sum(c for _, c in others),
            "processes_else": len(others), "busiest_else": others[:8]}


def ray_windows(data: Path, steps: int, window: int, skip: int, tmp: Path,
                name: str) -> tuple[list[float], dict]:
    """tokens/s of each --window steps of one Ray Train run (from its metrics.jsonl), and the
    cores its worker and everything else used from the end of warm-up to the last window."""
    model, marks = tmp / name, {}
    first, last = f"step {skip * window}/", f"step {steps - window}/"

    def watch(line: str) -> None:
        if first in line or last in line:
            marks[first if first in line else last] = (time.perf_counter(), cpu_seconds())

    run("train.py", ["--data", str(data), *flags(SHAPE), "--total_steps", str(steps),
                     "--eval_steps", str(steps), "--save_steps", str(steps), "--eval_batches",
                     "1", "--log_steps", str(window), "--storage_path", str(tmp / "runs"),
                     "--name", name, "--save_model_path", str(model)], tmp, watch)
    records = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    (t0, a), (t1, b) = marks[first], marks[last]
    return ([r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r],
            cores_used(a, b, t1 - t0))


def local_windows(data: Path, steps: int, window: int, seed: int) -> tuple[list[float], float]:
    """tokens/s of each --window steps of gpt2core's loop over the same rows, same settings,
    and the cores this process used while it ran."""
    import numpy as np
    import torch

    from gpt2core import GPT2, training
    from pipelines.common import dataset
    from pipelines.training.config import TrainConfig
    from pipelines.training.plan import make_plan

    torch.set_num_threads(os.cpu_count())
    cfg = TrainConfig(data=str(data), **SHAPE, total_steps=steps)
    plan = make_plan(cfg, json.loads((data / dataset.MANIFEST).read_text()), 1)
    rows, lengths = dataset.read_split(data, "train")
    torch.manual_seed(cfg.seed)
    state = training.TrainState.create(
        GPT2(plan.model_config), lr=cfg.base_lr, weight_decay=cfg.wd_rate,
        warmup_steps=cfg.warmup_steps, total_steps=steps, min_lr=cfg.min_lr, device="cpu",
        use_amp=False)
    tokens_per_step = cfg.batch_train * plan.seq_len
    rng, order, pos, rates = np.random.default_rng(seed), np.empty(0, np.int64), 0, []
    t0 = start = time.perf_counter()
    cpu0 = time.process_time()
    for step in range(1, steps + 1):
        if pos + plan.rows_per_batch > len(order):  # a new epoch, shuffled
            order, pos = rng.permutation(len(rows)), 0
        idx = order[pos:pos + plan.rows_per_batch]
        pos += plan.rows_per_batch
        batch = training.rows_to_batch(torch.from_numpy(rows[idx].astype(np.int64)),
                                       torch.from_numpy(lengths[idx].astype(np.int64)),
                                       plan.seq_len)
        state.step([batch], cfg.grad_clip)
        if step % window == 0:
            rates.append(window * tokens_per_step / (time.perf_counter() - t0))
            t0 = time.perf_counter()
    return rates, (time.process_time() - cpu0) / (time.perf_counter() - start)


def bench_throughput(text: str, vocab: int, rounds: int, steps: int, window: int, skip: int,
                     tmp: Path) -> dict:
    data = tmp / "data64"
    prep_s, _ = run("prepare.py", ["--corpus", text, "--out", str(data), "--seq_len", "64",
                                   "--vocab_size", str(vocab)], tmp)
    manifest = json.loads((data / "manifest.json").read_text())
    ray_all, ours_all, per_round = [], [], []
    for r in range(rounds):
        loads = [load()]
        print(f"throughput round {r + 1}/{rounds}: Ray Train ... ({loads[-1]})", flush=True)
        ray_w, ray_cores = ray_windows(data, steps, window, skip, tmp, f"tput{r}")
        ray_w = ray_w[skip:]
        loads.append(load())
        print(f"throughput round {r + 1}/{rounds}: gpt2core loop ... ({loads[-1]})", flush=True)
        ours_w, ours_cores = local_windows(data, steps, window, seed=r)
        ours_w = ours_w[skip:]
        ray_all += ray_w
        ours_all += ours_w
        per_round.append({"ray_tok_s": ray_w, "ours_tok_s": ours_w, "ray_cores": ray_cores,
                          "ours_cores": ours_cores,
                          "load_before_ray_ours_after": [*loads, load()],
                          "ratio": statistics.median(ray_w) / statistics.median(ours_w)})
    ray_med, ours_med = statistics.median(ray_all), statistics.median(ours_all)
    # the headline ratio pairs each Ray run with the loop run right after it (same load)
    ratio = statistics.median(r["ratio"] for r in per_round)
    return {"shape": SHAPE, "vocab_size": manifest["vocab_size"], "train_rows":
            manifest["splits"]["train"]["rows"], "steps_per_run": steps, "window_steps": window,
            "skipped_windows": skip, "rounds": per_round, "prepare_s": prep_s,
            "ray_tok_s": ray_med, "ours_tok_s": ours_med, "ratio": ratio,
            "ratio_of_pooled_medians": ray_med / ours_med,
            "target": TARGETS["ratio"]}


def bench_race(text: str, race: dict, tmp: Path) -> dict:
    out = tmp / "race"
    out.mkdir()
    load_before = load()
    seconds, lines = run("train.py", ["--train_corpus", text, "--data", str(out / "data"),
                                    *flags(race), "--storage_path", str(out / "runs"),
                                    "--save_model_path", str(out / "model")], out)
    records = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text()
               .splitlines()]
    final = [r for r in records if "eval/bpb" in r][-1]
    tps = [r["train/tokens_per_sec"] for r in records if "train/tokens_per_sec" in r]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    marks = [f"{t:6.1f} s  {line[-110:]}" for t, line in lines if any(
        k in line for k in ("prepared", "training gpt2", "MLflow run", "step ", "finished"))]
    return {"flags": race, "seconds": seconds, "eval_bpb": final["eval/bpb"],
            "eval_loss": final["eval/loss"], "step": final["step"],
            "tokens_per_sec_median": statistics.median(tps) if tps else None,
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "val_bytes": manifest["splits"]["val"]["bytes"], "log_marks": marks,
            "load_before": load_before, "load_after": load(),
            "target_bpb": TARGETS["race_bpb"], "target_seconds": TARGETS["race_seconds"],
            "command": "python pipelines/train.py --train_corpus TEXT --data TMP "
                       + " ".join(flags(race))}


def print_table(res: dict) -> None:
    if "throughput" in res:
        t = res["throughput"]
        ok = "ok" if t["ratio"] >= t["target"] else "MISS"
        print(f"\n{'throughput (tok/s, median of windows)':<40} {'Ray Train':>10} "
              f"{'gpt2core':>10} {'ratio':>7} {'target':>7}\n" + "-" * 80)
        case = f"4L/4H/128d ctx 64 batch 12, vocab {t['vocab_size']}"
        print(f"{case:<40} "
              f"{t['ray_tok_s']:>10.0f} {t['ours_tok_s']:>10.0f} {t['ratio']:>6.3f}x "
              f"{t['target']:>6.2f}x  {ok}")
        for i, r in enumerate(t["rounds"]):
            print(f"  round {i + 1}: {statistics.median(r['ray_tok_s']):>31.0f} "
                  f"{statistics.median(r['ours_tok_s']):>10.0f} {r['ratio']:>6.3f}x  "
                  f"(load {' / '.join(x.split()[2] for x in r['load_before_ray_ours_after'])})")
            c = r["ray_cores"]
            print(f"    cores used: Ray Train worker {c['worker']:.2f}, the {c['processes_else']} "
                  f"other processes {c['everything_else']:.2f}; gpt2core loop "
                  f"{r['ours_cores']:.2f}")
        busiest = t["rounds"][-1]["ray_cores"]["busiest_else"]
        print("    busiest others (last round): " + ", ".join(f"{n} {c:.3f}" for n, c in busiest))
    if "race" in res:
        r = res["race"]
        ok = "ok" if r["eval_bpb"] <= r["target_bpb"] and r["seconds"] <= \
            r["target_seconds"] else "MISS"
        print(f"\n{'Shakespeare race':<40} {'seconds':>10} {'eval bpb':>10} {'target':>15}\n"
              + "-" * 80)
        print(f"{'train.py ' + ' '.join(f'{k}={v}' for k, v in list(r['flags'].items())[:6]):<40}"
              f" {r['seconds']:>10.1f} {r['eval_bpb']:>10.3f} {'<=120 s, <=2.45':>15}  {ok}")
        print(f"  {r['command']}\n  {r['tokens_per_sec_median']:.0f} tok/s median, "
              f"{r['load_before']} before, {r['load_after']} after")
        print("\n".join(f"  {m}" for m in r["log_marks"]))
    m = res["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Ray {m['ray']}, {m['date']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--text", default=TEXT, help="corpus (default tinyshakespeare, else the "
                   "sample corpus when that file is missing)")
    p.add_argument("--only", choices=["throughput", "race"], help="run one part only")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE size for part 1")
    p.add_argument("--rounds", type=int, default=3, help="alternating Ray/ours runs")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=25, help="steps per tokens/s window")
    p.add_argument("--skip", type=int, default=2, help="warm-up windows dropped per run")
    p.add_argument("--race", nargs="*", default=[], metavar="FLAG=VALUE",
                   help="override RACE flags, e.g. total_steps=900")
    p.add_argument("--json", default="bench/results/train.json", help="where to write JSON")
    args = p.parse_args()
    text = args.text if Path(args.text).is_file() else "sample"
    race = {**RACE, **dict(kv.split("=", 1) for kv in args.race)}
    import ray

    res: dict = {"machine": machine_info(ray=ray.__version__, load_at_start=load()),
                 "text": text}
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        if args.only in (None, "race"):  # first: a fresh machine, as a user would run it
            print(f"race: {' '.join(flags(race))} ... ({load()})", flush=True)
            res["race"] = bench_race(text, race, Path(tmp))
        if args.only in (None, "throughput"):
            res["throughput"] = bench_throughput(text, args.vocab_size, args.rounds, args.steps,
                                                 args.window, args.skip, Path(tmp))
    res["load_at_end"] = load()
    print_table(res)
    out = ROOT / args.json if not Path(args.json).is_absolute() else Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
