"""make gpu-check: everything a CUDA GPU should show, in one run of at most 8 minutes.

    python bench/gpu_check.py                   # or: make gpu-check
    python bench/gpu_check.py --quick           # fewer steps and tokens (a smoke run)

1. the `gpu`-marked tests (pytest -m gpu)
2. training, in a fresh process (bench/gpu_training.py): GPT-2 124M's bare step eager (the
   loss that ran, and the chunked one beside it) and compiled at 16 and 32 x 1024, FSDP2 on one
   rank; tokens/s, MFU against the datasheet bf16 peak, memory, the first step's seconds; then
   `pipelines/train.py --gpus 1` beside the bare step at its shape. Targets on an H200: eager
   >= 380k tokens/s, compiled >= 530k and MFU >= 50 %, the pipeline >= 0.95x the bare step.
3. inference, in a fresh process (bench/gpu_inference.py): greedy decode tokens/s at batch 1,
   8, 32 and 128 (gpt2core.generate, a compiled engine, transformers eager and static-cache),
   a per-step profile (kernels, copies, syncs, ms) of the engine and of Serve's Decoder, and
   the Serve app on the GPU under 1, 16 and 64 streaming clients (tokens/s, TTFT p50/p99),
   and Serve's step beside a busy Python thread (the GIL).
4. evaluate on the GPU (pipelines/evaluate.py --smoke-test: a tiny model with and without Ray)
5. a Serve completion request to a replica given one GPU

Each part runs under a timeout that keeps the whole within BUDGET_S (tests 90 s, training
200 s, inference 220 s, evaluate 60 s at most); a part that runs out keeps the numbers it
finished and adds one FAIL line, and the parts after it still run. It prints one table and
writes JSON (default bench/results/gpu_check.json). Without CUDA it says so and exits 0, having
run nothing.
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
BUDGET_S = 480  # the whole check: one 8-minute run of the device's time
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def run_gpu_tests(timeout: int) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests",
                          "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"ok": out.returncode == 0, "summary": summary,
            "seconds": time.perf_counter() - start}


def fresh_process(script: str, timeout: int, quick: bool) -> dict:
    """bench/<script>.py in a fresh process (training: the bare step and the pipeline;
    inference: decode, the per-step profile, Serve): its JSON and table. It writes its JSON
    after every part, so one stopped at `timeout` still gives the parts it finished."""
    import importlib

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{script}.json"
        cmd = [sys.executable, f"bench/{script}.py", "--json", str(out),
               *(["--quick"] if quick else [])]
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
            ok, said = done.returncode == 0, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:
            ok, said = False, f"{e.stdout or ''}{e.stderr or ''}\nstopped after {timeout} s"
            said = said if isinstance(said, str) else said.decode(errors="replace")
        result = json.loads(out.read_text()) if out.is_file() else {}
    table = importlib.import_module(script).table(result) if result else ""
    return {**result, "ok": ok, "table": table, "tail": said.strip().splitlines()[-3:]}


def part_parser(doc: str, name: str, parts: str) -> argparse.ArgumentParser:
    """The flags gpu_training.py and gpu_inference.py share: --device, --quick, --skip, --json
    (default bench/results/<name>.json)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few steps and tokens")
    p.add_argument("--skip", nargs="*", default=[], help=f"parts to leave out: {parts}")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / f"{name}.json"))
    return p


def run_parts(parts: dict, results: dict, out: Path, table) -> int:
    """A fresh-process script's main loop (gpu_training.py, gpu_inference.py): each part's
    numbers into `results`, a failing part's error beside them, the JSON rewritten after every
    part (so a run stopped midway keeps what it finished), then the table printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for name, run in parts.items():
        try:
            results[name] = run()
        except Exception as e:  # noqa: BLE001 - one part failing leaves the others' numbers
            results[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    return 0


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
    for name in ("train", "inference"):  # fresh_process's: the part's own table
        r = results.get(name)
        if r:
            lines.append(r.get("table") or "")
            if not r.get("ok"):
                lines.append(f"  {name} FAIL {r.get('error') or r.get('tail')}")
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

    def attempt(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # one part failing still leaves the others' numbers
            return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}

    deadline = time.monotonic() + BUDGET_S

    def left(cap: int) -> int:  # a part's timeout: its cap, within what the budget has left
        return max(1, min(cap, int(deadline - time.monotonic()) - 30))

    if "tests" not in args.skip:
        results["gpu_tests"] = attempt(run_gpu_tests, left(90))
    if "train" not in args.skip:
        results["train"] = attempt(fresh_process, "gpu_training", left(200), args.quick)
    if "inference" not in args.skip:
        results["inference"] = attempt(fresh_process, "gpu_inference", left(220), args.quick)
    if "evaluate" not in args.skip:
        results["evaluate"] = attempt(evaluate_smoke, left(60))
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
