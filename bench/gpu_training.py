"""Training the way users meet it, in a fresh process: the bare step, then the pipeline.

    python bench/gpu_training.py                        # on CUDA (gpu_check runs it)
    python bench/gpu_training.py --device cpu --quick   # the same code, tiny shapes, on a CPU
                                                        # (bf16 there too: both losses run)

1. step: gpt2core.training.TrainState.step on random ids, the precision rule's dtype (bf16 on
   Ampere and later), GPT-2 124M (vocab 50304) at 16 x 1024: eager with the loss choose_loss
   picks and with the chunked one beside it, compiled, compiled at 32 x 1024, and FSDP2
   sharding over one rank (what `--strategy fsdp` with one worker no longer runs: it trains
   whole, as ddp). Tokens/s, MFU against the datasheet peak, peak memory, the loss that ran,
   the first step's seconds (compilation or warm-up).
2. pipeline: `python pipelines/train.py --gpus 1 --preset gpt2 --batch_train 16` as a user runs
   it (compiled: the default on CUDA), on a dataset prepared from this repository's own text
   (vocab 8192, rows of 1024: 92M parameters), beside the bare compiled step at that shape.
   Its tokens/s is the median of its logged windows after the first (Ray Train's own metric,
   train/tokens_per_sec, from the model dir's metrics.jsonl). --full adds the eager pair.

Targets (issue 27, one H200): eager >= 380k tokens/s at 16 x 1024; compiled >= 530k and MFU
>= 50 % at the best batch; the pipeline >= 0.95x the bare step. Prints a table, writes JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
CORPUS_DIRS = ("gpt2core", "pipelines", "serve", "docs", "bench")


def bare_step(device: str, *, vocab: int, batch: int, compile: bool, steps: int,
              quick: bool, loss: str | None = None, shard: bool = False) -> dict:
    """Tokens/s of TrainState.step at batch x seq tokens; `loss` forces an implementation,
    `shard` runs FSDP2 over a one-rank process group."""
    import torch
    import torch.distributed as dist

    from gpt2core import GPT2, GPT2Config, parallel, precision, training

    dev = torch.device(device)
    seq = 64 if quick else 1024
    shape = dict(n_layer=2, n_head=2, n_embd=64, n_positions=seq) if quick else {}
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=vocab, **shape))
    if shard and not dist.is_initialized():
        store = dist.FileStore(tempfile.mktemp(prefix="gpu-training-store-"), 1)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0,
                                world_size=1)

    def wrap(m):
        m = parallel.shard(m, precision.autocast_dtype("auto", dev)) if shard else m
        return torch.compile(m) if compile else m

    state = training.TrainState.create(model, lr=6e-4, weight_decay=0.1, warmup_steps=10,
                                       total_steps=1000, min_lr=None, device=dev,
                                       precision="bf16" if quick else "auto", wrap=wrap)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    micro = [training.rows_to_batch(ids, None, seq)]
    state.step(micro, 1.0)  # the first step: the loss is chosen, compilation happens
    if loss:
        state.raw.loss_impl = loss
    for _ in range(2):
        state.step(micro, 1.0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        out, _ = state.step(micro, 1.0)
    float(out)
    seconds = time.perf_counter() - start
    tps = steps * batch * seq / seconds
    peak = training.peak_flops(dev, state.dtype)
    result = {"vocab": vocab, "batch": batch, "seq": seq, "compile": compile, "shard": shard,
              "loss_impl": state.raw.loss_impl, "dtype": str(state.dtype), "tokens_per_s": tps,
              "mfu": model.estimate_mfu(tps, peak, seq), "first_step_s": state.first_step_s,
              "compile_error": state.compile_error,
              "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9
              if device == "cuda" else None}
    del state, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def steps_part(device: str, quick: bool, steps: int) -> list[dict]:
    vocab = 512 if quick else 50304  # 124M: 50257 padded to 128s
    runs = [dict(batch=16, compile=False), dict(batch=16, compile=False, loss="chunked"),
            dict(batch=16, compile=True), dict(batch=32, compile=True),
            dict(batch=16, compile=False, shard=True)]
    out = []
    for run in runs:
        try:
            out.append(bare_step(device, vocab=vocab, steps=steps, quick=quick, **run))
        except Exception as e:  # noqa: BLE001 - one shape failing leaves the others
            out.append({**run, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    return out


def prepare_corpus(out: Path, quick: bool) -> None:
    """A dataset dir from this repository's own Python and Markdown (~1 MB of text): the GPU
    machine reaches no corpus, and this one travels with the checkout."""
    files = sorted(str(p) for d in CORPUS_DIRS for p in (ROOT / d).rglob("*")
                   if p.suffix in (".py", ".md") and p.is_file())
    cmd = [sys.executable, "pipelines/prepare.py", "--corpus", *files, "--out", str(out),
           "--vocab_size", "512" if quick else "8192", "--seq_len", "64" if quick else "1024"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"prepare failed: {(done.stdout + done.stderr)[-500:]}")


def pipeline_run(device: str, data: Path, tmp: Path, compile: bool, quick: bool,
                 steps: int) -> dict:
    """`pipelines/train.py` as a user runs it; its logged tokens/s after the first window."""
    name = f"run-{'compiled' if compile else 'eager'}"
    cmd = [sys.executable, "pipelines/train.py", "--data", str(data), "--name", name,
           "--storage_path", str(tmp / "runs"), "--tracking_uri", f"sqlite:///{tmp}/mlflow.db",
           "--total_steps", str(steps), "--log_steps", str(max(1, steps // 6)),
           "--eval_steps", str(steps), "--save_steps", str(steps), "--eval_batches", "1",
           "--warmup_steps", "2", "--compile" if compile else "--no-compile"]
    cmd += (["--preset", "tiny", "--layers", "2", "--heads", "2", "--dims", "64",
             "--batch_train", "8", "--num_workers", "1"] if quick else
            ["--preset", "gpt2", "--batch_train", "16", "--gpus", "1"])
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode:
        raise RuntimeError(f"train failed: {(done.stdout + done.stderr)[-800:]}")
    lines = (tmp / "runs" / name / "model" / "metrics.jsonl").read_text().splitlines()
    windows = [r for r in map(json.loads, lines) if "train/tokens_per_sec" in r]
    later = windows[1:] or windows
    first = [ln for ln in done.stdout.splitlines() if "first step" in ln]
    return {"compile": compile, "tokens_per_s": statistics.median(
                r["train/tokens_per_sec"] for r in later),
            "mfu": statistics.median(r["train/mfu"] for r in later),
            "windows": len(windows), "first_step": first[0].strip() if first else None,
            "seconds": time.perf_counter() - start}


def pipeline_part(device: str, quick: bool, full: bool, steps: int) -> list[dict]:
    """The pipeline beside the bare step at its shape, compiled (and eager with --full)."""
    out = []
    with tempfile.TemporaryDirectory(prefix="gpu-training-") as d:
        tmp = Path(d)
        prepare_corpus(tmp / "data", quick)
        vocab = json.loads((tmp / "data" / "manifest.json").read_text())["vocab_size"]
        for compile in ([True, False] if full else [True]):
            row: dict = {"compile": compile}
            try:
                row["pipeline"] = pipeline_run(device, tmp / "data", tmp, compile, quick,
                                               steps)
                row["bare"] = bare_step(device, vocab=vocab, batch=8 if quick else 16,
                                        compile=compile, steps=10, quick=quick)
                row["ratio"] = row["pipeline"]["tokens_per_s"] / row["bare"]["tokens_per_s"]
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out.append(row)
    return out


def table(results: dict) -> str:
    lines = ["training (bare step: TrainState.step on random ids)"]
    for r in results.get("step", []):
        what = (f"{'compiled' if r['compile'] else 'eager':8} {r['batch']:>2}x{r.get('seq', '?')}"
                f"{' fsdp2 on 1 rank' if r.get('shard') else ''}")
        if "error" in r:
            lines.append(f"  {what:32} FAIL {r['error']}")
            continue
        memory = f", {r['max_memory_gb']:.1f} GB" if r.get("max_memory_gb") else ""
        lines.append(f"  {what:32} {r['tokens_per_s']:>10,.0f} tok/s  MFU {100 * r['mfu']:5.1f} %"
                     f"  loss {r['loss_impl']:7}  first step {r['first_step_s']:.1f} s{memory}"
                     + (f"  (compile fell back: {r['compile_error']})"
                        if r.get("compile_error") else ""))
    if "step_error" in results:
        lines.append(f"  step: FAIL {results['step_error']}")
    for r in results.get("pipeline", []):
        what = f"pipeline {'compiled' if r['compile'] else 'eager'}"
        if "error" in r:
            lines.append(f"  {what:32} FAIL {r['error']}")
            continue
        p, b = r["pipeline"], r["bare"]
        lines.append(f"  {what:32} {p['tokens_per_s']:>10,.0f} tok/s  MFU {100 * p['mfu']:5.1f} %"
                     f"  = x{r['ratio']:.2f} the bare step ({b['tokens_per_s']:,.0f}, vocab "
                     f"{b['vocab']}); {p['windows']} windows, {p['seconds']:.0f} s in all")
    if "pipeline_error" in results:
        lines.append(f"  pipeline: FAIL {results['pipeline_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gpu_check import part_parser, run_parts

    p = part_parser(__doc__, "gpu_training", "step pipeline")
    p.add_argument("--full", action="store_true", help="the eager pipeline too")
    args = p.parse_args(argv)
    steps = 4 if args.quick else 20
    parts = {"step": lambda: steps_part(args.device, args.quick, steps),
             "pipeline": lambda: pipeline_part(args.device, args.quick, args.full,
                                               6 if args.quick else 60)}
    parts = {k: v for k, v in parts.items() if k not in args.skip}
    return run_parts(parts, {"device": args.device}, Path(args.json), table)

if __name__ == "__main__":
    sys.exit(main())
