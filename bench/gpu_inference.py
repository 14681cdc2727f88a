"""Inference the way users meet it, in a fresh process: Serve, a per-step profile, decode.

    python bench/gpu_inference.py                       # on CUDA (gpu_check runs it)
    python bench/gpu_inference.py --device cpu --quick  # the same code on a tiny model, CPU

In the order they run (Serve first: a run cut short by its budget keeps the headline):

1. serve: the Serve app (serve/app.py) on one replica given the GPU, a 124M-shape model with
   OpenAI's vocabulary, streaming clients at 1, 16 and 64 concurrent (64 new tokens, top_p
   0.9): tokens/s, time to first token p50/p99 (bench/bench_serve.py's client), and from the
   replica's /healthz the mean decode step and the mean gap between steps over the level (the
   decode thread's own work between steps, when the GPU idles), the rows a step and the
   decode thread's busy share;
2. profile: one decoding step of the engine at 1 and 16 rows, eager and compiled, and of
   Serve's Decoder at 1 and 16 rows, under torch.profiler: kernels launched, device-to-host
   copies and host syncs per step, CPU and device ms per step;
3. decode: greedy tokens/s of GPT-2 124M (random weights, bf16 on GPUs) at batch 1, 8, 32 and
   128, 16-token prompts: gpt2core.generate (its default, the eager engine), one
   gpt2core.engine.Engine kept across runs with its step compiled (CUDA graphs: how Serve and
   `gpt2 generate` decode on GPUs), transformers' generate (eager; and with its static cache
   + compile).
4. gil: Serve's Decoder step at 1 and 16 rows (compiled on CUDA, as a replica runs it) with
   another Python thread idle, busy half of every 2 ms, and busy throughout: what sharing the
   GIL with a busy event loop costs the decode thread (each GIL hand-off waits for the other
   thread; an eager step hands off once per op, a CUDA-graph step a few times).

Targets (issue 26, one H200): batch-1 greedy >= 1,000 tokens/s and >= 2x transformers' eager
generate at batch 1, 8 and 32; served 16 clients >= 10x one client and >= 3,000 tokens/s, 64
clients >= 8,000 tokens/s, TTFT p50 at 1 client <= 30 ms. Prints a table, writes JSON.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_model(device: str, quick: bool):
    import torch

    from gpt2core import GPT2, GPT2Config, precision

    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if quick else {}
    model = GPT2(GPT2Config(**shape)).to(device).eval()
    return precision.for_inference(model)


def timed(device: str, fn) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode(device: str, batches: list[int], new_tokens: int, quick: bool) -> list[dict]:
    import torch
    from gpu_check import _hf_model

    from gpt2core.engine import Engine, Sampling
    from gpt2core.generation import generate

    model = make_model(device, quick)
    hf = _hf_model(model, device)
    rows = []
    for batch in batches:
        prompt = torch.randint(0, model.config.vocab_size, (batch, 16))
        row = {"batch": batch, "dtype": str(next(model.parameters()).dtype)}
        generate(model, prompt, 4, temperature=0.0)  # warm-up
        row["generate_tok_s"] = batch * new_tokens / timed(
            device, lambda: generate(model, prompt, new_tokens, temperature=0.0))
        engine = Engine(model, batch, 16 + new_tokens, compile=True)
        greedy = Sampling.of(batch, device, temperature=0.0)

        def run() -> None:
            engine.admit(range(batch), prompt.tolist(), greedy)
            for _ in range(new_tokens - 1):
                engine.step(batch)[0].tolist()  # the step's one host read, as callers do

        run()  # compiles (and captures, on CUDA)
        row["engine_compiled_tok_s"] = batch * new_tokens / timed(device, run)
        if hf is not None:
            ids = prompt.to(device)
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=0, attention_mask=torch.ones_like(ids))
            hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
            row["transformers_tok_s"] = batch * new_tokens / timed(
                device, lambda: hf.generate(ids, **kw))
            try:  # its static cache, which compiles the forward pass (transformers >= 4.45)
                static = {**kw, "cache_implementation": "static"}
                hf.generate(ids, **static)
                row["transformers_static_tok_s"] = batch * new_tokens / timed(
                    device, lambda: hf.generate(ids, **static))
            except Exception as e:  # noqa: BLE001 - an older transformers: say so, go on
                row["transformers_static_error"] = f"{type(e).__name__}: {str(e)[:120]}"
            row["vs_transformers"] = row["generate_tok_s"] / row["transformers_tok_s"]
            row["compiled_vs_transformers"] = \
                row["engine_compiled_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
    return rows


def profile_step(device: str, quick: bool) -> list[dict]:
    """Per decoding step: kernels, device-to-host copies, host syncs, CPU and device ms."""
    from torch.profiler import ProfilerActivity, profile

    from gpt2core import Tokenizer
    from gpt2core.engine import Engine, Sampling
    from serve.batching import Decoder, Generation

    model = make_model(device, quick)
    tok = Tokenizer.from_pretrained(ROOT / "tests" / "assets" / "gpt2")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows, steps = [], 5
    for rows_n in (1, 16):
        prompts = [[1, 2, 3, 4] for _ in range(rows_n)]
        cases = {}
        for compile in (False, True):
            engine = Engine(model, rows_n, 64, compile=compile)
            engine.admit(range(rows_n), prompts, Sampling.of(rows_n, device, top_p=0.9, seed=1))
            for _ in range(3):  # warm-up: compiles and captures
                engine.step(rows_n)[0].tolist()
            cases[f"engine {'compiled' if compile else 'eager'}"] = \
                lambda e=engine: e.step(rows_n)[0].tolist()
        decoder = Decoder(model, tok, rows_n)
        decoder.step([(i, Generation([1, 2, 3, 4], 200, top_p=0.9, seed=i))
                      for i in range(rows_n)])
        decoder.step()
        cases["serve Decoder"] = decoder.step
        for name, fn in cases.items():
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    fn()
                sync(device)
            events = prof.key_averages()
            count = {e.key: e.count for e in events}
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
            d2h = sum(n for k, n in count.items() if "DtoH" in k or "Memcpy DtoH" in k)
            rows.append({
                "what": name, "rows": rows_n,
                "kernels_per_step": kernels / steps,
                "d2h_copies_per_step": d2h / steps,
                "syncs_per_step": (count.get("aten::_local_scalar_dense", 0)
                                   + count.get("cudaStreamSynchronize", 0)) / steps,
                "cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1e3 / steps,
                "device_ms_per_step": sum(getattr(e, "self_device_time_total", 0)
                                          for e in events) / 1e3 / steps})
    return rows


def gil_steps(device: str, quick: bool) -> list[dict]:
    """Median ms of Serve's Decoder step beside a Python thread busy 0, 50 and 100 % of the
    time (1 ms busy, 1 ms asleep at 50 %)."""
    import statistics
    import threading

    from gpt2core import Tokenizer
    from serve.batching import Decoder, Generation

    model = make_model(device, quick)
    tok = Tokenizer.from_pretrained(ROOT / "tests" / "assets" / "gpt2")
    out = []
    for rows_n in (1, 16):
        decoder = Decoder(model, tok, rows_n, compile=device == "cuda")
        decoder.warm_up()
        decoder.step([(i, Generation([1, 2, 3, 4], 200, seed=i)) for i in range(rows_n)])
        row = {"rows": rows_n}
        for duty in (0.0, 0.5, 1.0):
            stop = threading.Event()

            def busy(duty=duty, stop=stop) -> None:  # pure Python, as an event loop runs
                while not stop.is_set():
                    start = time.perf_counter()
                    while time.perf_counter() - start < 1e-3:
                        pass
                    if duty < 1:
                        time.sleep(1e-3)

            other = threading.Thread(target=busy, daemon=True)
            if duty:
                other.start()
            times = [timed(device, decoder.step) for _ in range(15)]
            stop.set()
            if duty:
                other.join()
            row[f"busy_{int(100 * duty)}_ms"] = 1e3 * statistics.median(times[3:])
        out.append(row)
    return out


def serve_levels(device: str, clients: list[int], quick: bool) -> list[dict]:
    """The Serve app on one replica (the GPU, when there is one), streaming clients."""
    import asyncio
    import socket

    import httpx
    import ray
    from bench_serve import level, make_model_dir, steps
    from ray import serve

    from serve.app import AppArgs, app

    ray.init(address="local", include_dashboard=False, logging_level="error")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / "gpt2-124m-random"
            make_model_dir(model_dir, smoke=quick)
            # compiled on a CPU too (a GPU's default), so a CPU run tries the same path; the
            # replica compiles and captures every batch size before it takes a request
            serve.run(app(AppArgs(model_dir=str(model_dir), num_gpus=1 if device == "cuda"
                                  else 0, max_batch_size=max(clients), compile="on")),
                      name="inference", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            asyncio.run(level(url, 1, 2, 8))  # warm-up: the client's connections
            levels = []
            for c in clients:
                before = httpx.get(f"{url}/healthz", timeout=60).json()
                row = asyncio.run(level(url, c, 2 if c < 64 else 1, 64))
                after = httpx.get(f"{url}/healthz", timeout=60).json()
                levels.append({**row, **steps(before, after, row["wall_s"])})
            return levels
    finally:
        serve.shutdown()
        ray.shutdown()


def table(results: dict) -> str:
    lines = []
    for r in results.get("decode", []):
        hf = (f"  transformers {r['transformers_tok_s']:>8,.0f}"
              f" (static {r.get('transformers_static_tok_s', float('nan')):>8,.0f})"
              f"  x{r['vs_transformers']:.2f} / x{r['compiled_vs_transformers']:.2f}"
              if "transformers_tok_s" in r else "")
        lines.append(f"  decode batch {r['batch']:>3}  generate {r['generate_tok_s']:>9,.0f}  "
                     f"engine compiled {r['engine_compiled_tok_s']:>9,.0f} tok/s{hf}")
    for r in results.get("profile", []):
        lines.append(f"  step {r['what']:<17} rows {r['rows']:>2}: "
                     f"{r['kernels_per_step']:>6.0f} kernels, {r['d2h_copies_per_step']:.0f} "
                     f"D2H, {r['syncs_per_step']:.0f} syncs, CPU {r['cpu_ms_per_step']:.2f} ms, "
                     f"device {r['device_ms_per_step']:.2f} ms")
    for r in results.get("serve", []):
        lines.append(f"  serve {r['clients']:>3} clients  {r['tokens_per_s']:>9,.0f} tok/s  "
                     f"TTFT p50 {1e3 * r['ttft_p50_s']:.0f} ms p99 {1e3 * r['ttft_p99_s']:.0f}"
                     f" ms  latency p50 {r['p50_s']:.2f} s  step {r.get('step_ms', 0):.2f}"
                     f" ms, gap {r.get('gap_ms', 0):.2f} ms, {r.get('rows_per_step', 0):.1f} "
                     f"rows, busy {100 * r.get('busy', 0):.0f} %")
    for r in results.get("gil", []):
        lines.append(f"  step beside a busy Python thread, rows {r['rows']:>2}: idle "
                     f"{r['busy_0_ms']:.2f} ms, busy half {r['busy_50_ms']:.2f} ms, busy "
                     f"{r['busy_100_ms']:.2f} ms")
    for part in ("decode", "profile", "serve", "gil"):
        if f"{part}_error" in results:
            lines.append(f"  {part}: FAIL {results[f'{part}_error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from gpu_check import part_parser, run_parts

    args = part_parser(__doc__, "gpu_inference", "decode profile serve gil").parse_args(argv)
    new_tokens = 16 if args.quick else 128
    # the headline first: a run cut short by its budget loses transformers' compiles, last
    parts = {"serve": lambda: serve_levels(args.device, [1, 16, 64], args.quick),
             "profile": lambda: profile_step(args.device, args.quick),
             "decode": lambda: decode(args.device, [1, 8, 32, 128], new_tokens, args.quick),
             "gil": lambda: gil_steps(args.device, args.quick)}
    parts = {k: v for k, v in parts.items() if k not in args.skip}
    return run_parts(parts, {"device": args.device}, Path(args.json), table)

if __name__ == "__main__":
    sys.exit(main())
