"""make gpu-check: everything a CUDA GPU should show, in one run of under 10 minutes.

    python bench/gpu_check.py                   # or: make gpu-check
    python bench/gpu_check.py --quick           # fewer steps and tokens (a smoke run)

1. the `gpu`-marked tests (pytest -m gpu)
2. GPT-2 124M training throughput on random tokens, bf16 autocast (the precision rule's choice),
   torch.compile off and on: tokens/s and MFU against the GPU's datasheet dense bf16 peak
   (gpt2core.training.GPU_PEAK_FLOPS). Target on H100/H200: MFU >= 50 % with compile.
3. inference, in a fresh process (bench/gpu_inference.py): greedy decode tokens/s at batch 1,
   8, 32 and 128 (gpt2core.generate, a compiled engine, transformers eager and static-cache),
   a per-step profile (kernels, copies, syncs, ms) of the engine and of Serve's Decoder, and
   the Serve app on the GPU under 1, 16 and 64 streaming clients (tokens/s, TTFT p50/p99).
4. evaluate on the GPU (pipelines/evaluate.py --smoke-test: a tiny model with and without Ray)
5. a Serve completion request to a replica given one GPU

It prints one table and writes JSON (default bench/results/gpu_check.json). Without CUDA it
says so and exits 0, having run nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def run_gpu_tests(timeout: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"ok": out.returncode == 0, "summary": summary,
            "seconds": time.perf_counter() - start}


def train_throughput(compile: bool, batch: int, steps: int) -> dict:
    """Tokens/s and MFU of GPT-2 124M optimizer steps (batch x 1024 tokens) on random ids."""
    import torch

    from gpt2core import GPT2, GPT2Config, parallel, training

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=50304))  # 124M; 50304 = 50257 padded to 128s
    state = training.TrainState.create(
        model, lr=6e-4, weight_decay=0.1, warmup_steps=10, total_steps=1000, min_lr=None,
        device=device, precision="auto",
        wrap=lambda m: parallel.wrap(m, "ddp", device=device, dtype=None, compile=compile))
    ids = torch.randint(0, 50257, (batch, 1025))
    batch_ = training.rows_to_batch(ids, None, 1024)
    warm = 3 if compile else 1  # compile happens in the first step
    for _ in range(warm):
        state.step([batch_], 1.0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss, _ = state.step([batch_], 1.0)
    torch.cuda.synchronize()
    tps = steps * batch * 1024 / (time.perf_counter() - start)
    peak = training.peak_flops(device, state.dtype)
    result = {"compile": compile, "dtype": str(state.dtype), "batch": batch,
              "tokens_per_s": tps, "mfu": model.estimate_mfu(tps, peak, 1024),
              "peak_flops": peak, "loss": float(loss),
              "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    del state, model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def inference(timeout: int, quick: bool) -> dict:
    """bench/gpu_inference.py in a fresh process (not after the compiled training part):
    decode, the per-step profile and Serve under streaming clients; its JSON and table."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inference.json"
        done = subprocess.run([sys.executable, "bench/gpu_inference.py", "--json", str(out),
                               *(["--quick"] if quick else [])], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)
        result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(ok=done.returncode == 0, table=done.stdout.rstrip(),
                  tail=(done.stdout + done.stderr).strip().splitlines()[-3:])
    return result


def _hf_model(model, device: str = "cuda"):
    """transformers' GPT2LMHeadModel with our weights, in the same inference dtype; None when
    transformers is not installed (it is the bench extra)."""
    try:
        import transformers
    except ImportError:
        return None
    from gpt2core import precision

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d)
    return hf.to(device, precision.inference_dtype(next(model.parameters()).device)).eval()


def evaluate_smoke(timeout: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "pipelines/evaluate.py", "--smoke-test"], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    tail = (out.stdout + out.stderr).strip().splitlines()[-3:]
    return {"ok": out.returncode == 0, "tail": tail, "seconds": time.perf_counter() - start}


def serve_smoke() -> dict:
    """One completion from a one-GPU replica of a tiny model."""
    import ray
    import torch
    from ray import serve

    from gpt2core import GPT2, GPT2Config, Tokenizer
    from serve.app import AppArgs, app

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train(["ROMEO: What light through yonder window breaks?"] * 4,
                              vocab_size=300)
        torch.manual_seed(0)
        GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=64, n_layer=2,
                        n_head=2)).save_pretrained(Path(tmp) / "tiny", tokenizer=tok)
        ray.init(address="local", include_dashboard=False, logging_level="warning")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": 8000})
            serve.run(app(AppArgs(model_dir=str(Path(tmp) / "tiny"), num_gpus=1)),
                      name="gpu-check", route_prefix="/")
            body = json.dumps({"prompt": "ROMEO:", "max_tokens": 16}).encode()
            req = urllib.request.Request("http://127.0.0.1:8000/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                reply = json.loads(resp.read())
            ok = bool(reply["choices"]) and reply["usage"]["completion_tokens"] > 0
            return {"ok": ok, "completion_tokens": reply["usage"]["completion_tokens"],
                    "seconds": time.perf_counter() - start}
        finally:
            serve.shutdown()
            ray.shutdown()


def table(results: dict) -> str:
    lines = [f"gpu-check on {results['machine'].get('gpu')} "
             f"(capability {results['machine'].get('capability')})"]
    t = results.get("gpu_tests")
    if t:
        lines.append(f"  gpu tests            {'ok  ' if t['ok'] else 'FAIL'} {t['summary']}")
    for r in results.get("train", []):
        if "error" in r:
            lines.append(f"  train compile={r['compile']!s:5}  FAIL {r['error']}")
            continue
        lines.append(f"  train compile={r['compile']!s:5}  {r['tokens_per_s']:>10,.0f} tok/s  "
                     f"MFU {100 * r['mfu']:5.1f} %  ({r['dtype']}, batch {r['batch']}x1024, "
                     f"{r['max_memory_gb']:.1f} GB)")
    r = results.get("inference")
    if r:
        lines.append(r["table"] if r.get("ok") else f"  inference FAIL {r.get('tail')}")
    for name in ("evaluate", "serve"):
        r = results.get(name)
        if r:
            lines.append(f"  {name:<20} {'ok  ' if r.get('ok') else 'FAIL'} "
                         f"{r.get('error') or ''} ({r.get('seconds', 0):.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default="bench/results/gpu_check.json", help="where to write JSON")
    p.add_argument("--quick", action="store_true", help="fewer steps and tokens")
    p.add_argument("--batch", type=int, default=0,
                   help="training sequences per step (0: 16 on GPUs of 60 GB and more, else 8)")
    p.add_argument("--skip", nargs="*", default=[], help="parts to leave out: tests train "
                   "inference evaluate serve")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible (torch "
              f"{torch.__version__}); nothing was run. Run it on a machine with a GPU.")
        return 0
    from machine import machine_info

    props = torch.cuda.get_device_properties(0)
    results: dict = {"machine": machine_info(
        gpu=props.name, capability=f"{props.major}.{props.minor}",
        gpu_memory_gb=props.total_memory / 1e9, cuda=torch.version.cuda)}
    batch = args.batch or (16 if props.total_memory > 60e9 else 8)
    steps = 5 if args.quick else 20

    def attempt(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # one part failing still leaves the others' numbers
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}

    if "tests" not in args.skip:
        results["gpu_tests"] = attempt(run_gpu_tests, 150)
    if "train" not in args.skip:
        results["train"] = [attempt(train_throughput, c, batch, steps) | {"compile": c}
                            for c in (False, True)]
    if "inference" not in args.skip:
        results["inference"] = attempt(inference, 330, args.quick)
    if "evaluate" not in args.skip:
        results["evaluate"] = attempt(evaluate_smoke, 150)
    if "serve" not in args.skip:
        results["serve"] = attempt(serve_smoke)
    results["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    print(table(results))
    out = ROOT / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
