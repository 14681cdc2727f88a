"""Benchmark checkpoint uploads: how long training stalls around a save, sync against async.

The same `gpt2 train` run twice per round, --checkpoint_upload_mode sync then async, saving
every --save_every steps to object storage (moto's S3 server on 127.0.0.1, started here: an
upload goes over HTTP as on a cluster, not as a local copy). With --log_steps 1 each step's
record has its own step time (tokens per step / train/tokens_per_sec) and train/pause_s, the
seconds spent after the step before, outside optimizer steps (evaluating, checkpointing and
reporting). The number that matters is the longest step around a save: the step time plus
the pause in front of it. Rounds alternate the two modes so drifting load hits both.

    .venv/bin/python bench/bench_checkpoint.py                 # ~4 min on 2 cores
    .venv/bin/python bench/bench_checkpoint.py --rounds 1 --dims 256
It prints a table and writes JSON (default bench/results/checkpoint.json) naming the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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


def s3_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free port, its endpoint in this process's environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H",
                             "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                      allow_bucket_creation=True).create_dir("bench")
    return proc, "s3://bench"


def one_run(args, data: str, storage: str, mode: str, name: str) -> dict:
    """One training run; its per-step records, from the model dir it exported."""
    from gpt2core import storage as st
    from pipelines.train import train
    from pipelines.training.config import TrainConfig

    cfg = TrainConfig(data=data, storage_path=f"{storage}/runs", name=name, layers=args.layers,
                      heads=args.heads, dims=args.dims, seq_len=args.seq_len,
                      batch_train=args.batch, total_steps=args.steps, log_steps=1,
                      eval_steps=args.steps, eval_batches=1, save_steps=args.save_every,
                      keep_checkpoints=2, checkpoint_upload_mode=mode,
                      tracking_uri=f"sqlite:///{args.tmp}/mlflow.db")
    start = time.perf_counter()
    out = train(cfg)
    wall = time.perf_counter() - start
    lines = st.read_text(st.join(out["model_dir"], "metrics.jsonl")).splitlines()
    records = [r for r in map(json.loads, lines) if "train/tokens_per_sec" in r]
    tokens = args.batch * args.seq_len
    steps = {r["step"]: tokens / r["train/tokens_per_sec"] + r.get("train/pause_s", 0.0)
             for r in records}
    saves = [s + 1 for s in range(args.save_every, args.steps, args.save_every)]
    return {"mode": mode, "wall_s": wall,
            "median_step_s": statistics.median(steps.values()),
            "longest_step_at_save_s": max(steps[s] for s in saves if s in steps),
            "mean_step_at_save_s": statistics.mean(steps[s] for s in saves if s in steps),
            "checkpoint_mb": args.checkpoint_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--save_every", type=int, default=6)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dims", type=int, default=384)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench/results/checkpoint.json"))
    args = p.parse_args()
    info = machine_info(torch_threads=os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        server, bucket = s3_server(Path(tmp))
        try:
            from pipelines.preparing.config import PrepareConfig
            from pipelines.preparing.driver import prepare

            data = f"{tmp}/data"
            prepare(PrepareConfig(corpus=[TEXT], out=data, seq_len=args.seq_len,
                                  vocab_size=2048))
            params = 12 * args.layers * args.dims ** 2 + 2048 * args.dims
            args.checkpoint_mb = round(3 * 4 * params / 1e6, 1)  # weights + AdamW's 2 moments
            runs = []
            for r in range(args.rounds):
                for mode in ("sync", "async"):
                    runs.append({"round": r, **one_run(args, data, bucket, mode, f"{mode}{r}")})
                    print(runs[-1], flush=True)
        finally:
            server.terminate()
    table = {}
    for mode in ("sync", "async"):
        mine = [x for x in runs if x["mode"] == mode]
        table[mode] = {k: statistics.median(x[k] for x in mine) for k in
                       ("median_step_s", "longest_step_at_save_s", "mean_step_at_save_s",
                        "wall_s")}
    ratio = table["sync"]["longest_step_at_save_s"] / table["async"]["longest_step_at_save_s"]
    print(f"\n{'mode':<6}{'median step':>13}{'longest at save':>17}{'mean at save':>14}"
          f"{'wall':>9}   ({args.checkpoint_mb} MB checkpoints to moto S3; {info['cpu']})")
    for mode, t in table.items():
        print(f"{mode:<6}{t['median_step_s']:>12.3f}s{t['longest_step_at_save_s']:>16.3f}s"
              f"{t['mean_step_at_save_s']:>13.3f}s{t['wall_s']:>8.1f}s")
    print(f"longest step at a save, sync / async: {ratio:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "args": {
        k: v for k, v in vars(args).items() if k != "tmp"}, "runs": runs, "table": table,
        "sync_over_async_longest_step": ratio}, indent=1))


if __name__ == "__main__":
    main()
