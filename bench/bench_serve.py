"""Benchmark the Serve app: dynamic batching vs none, at 1, 4 and 16 concurrent clients.

What it measures, in one run on this machine: a GPT-2 124M-shape model (random weights, OpenAI's
vocabulary) served by serve/app.py, one replica holding all of the machine's CPUs (torch threads =
that count, printed). Each client sends POST /v1/completions (prompt of ~16 tokens, 64 new tokens,
top_p 0.9, its own seed) one after another; tokens/s = completion tokens / wall time of the level;
latency = per request, end to end, p50 and p99; TTFT = time to the first streamed chunk with
text (requests stream, with `include_usage` for the token count), p50 and p99. The same app is
deployed twice, side by side: with `max_batch_size=16` (continuous batching: a request joins
the running decode batch at its next step) and with `max_batch_size=1`; each client level runs
on one, then the other.

Target at 16 clients: batching >= 4x the tokens/s of max_batch_size=1, and p99 <= 2x p50.

Run:
    .venv/bin/python bench/bench_serve.py               # full, ~3 min on 2 CPU cores
    .venv/bin/python bench/bench_serve.py --smoke-test  # a tiny model, seconds
    .venv/bin/python bench/bench_serve.py --standin --clients 1 16  # launch-bound stand-in
    .venv/bin/python bench/bench_serve.py --standin --ref max_ongoing_requests=32  # A/B a field
It prints a table and writes JSON (default bench/results/bench_serve.json) naming the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from machine import machine_info  # bench/machine.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the Roman Empire begins with a small city on the banks of the river"


def machine() -> dict:
    import ray

    return machine_info(ray=ray.__version__)


def steps(before: dict, after: dict, wall_s: float) -> dict:
    """From a replica's /healthz before and after a level of `wall_s` seconds: the mean ms of
    its decode steps and of the gaps between them while rows decode (the decode thread's
    work between steps, when a GPU would sit idle), the mean rows a step, and how busy it
    was (the share of the level's wall time spent in steps)."""
    a, b = after["batches"], before["batches"]
    count = max(1, a["count"] - b["count"])
    return {"step_ms": 1e3 * (a["step_seconds"] - b["step_seconds"]) / count,
            "gap_ms": 1e3 * (a["gap_seconds"] - b["gap_seconds"]) / max(1, a["gaps"] - b["gaps"]),
            "rows_per_step": (a["rows"] - b["rows"]) / count,
            "busy": (a["step_seconds"] - b["step_seconds"]) / wall_s}


def make_model_dir(path: Path, smoke: bool, standin: bool = False) -> None:
    """GPT-2 124M's shape with OpenAI's vocabulary (random weights); `smoke`: 2 x 64 wide;
    `standin`: launch-bound like a 124M decode step on a GPU, many small kernels (12 layers x
    64 wide, a 300-token vocabulary trained here on PROMPT)."""
    import torch

    from gpt2core import GPT2, GPT2Config, Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train([PROMPT] * 8, vocab_size=300) if standin else \
        Tokenizer.from_pretrained(ROOT / "tests" / "assets" / "gpt2")
    shape = dict(n_layer=2, n_head=2, n_embd=64) if smoke else \
        dict(n_layer=12, n_head=4, n_embd=64) if standin else \
        dict(n_layer=12, n_head=12, n_embd=768)
    GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=1024, **shape)).save_pretrained(
        path, tokenizer=tok)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for i in range(per_client):
            t0 = time.perf_counter()
            first = None
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "top_p": 0.9,
                    "seed": 1000 * c + i, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[len("data: "):])
                    if chunk["choices"] and first is None:
                        first = time.perf_counter() - t0  # time to first token
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - t0)
            ttfts.append(first)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_s": statistics.median(latencies),
            "p99_s": percentile(latencies, 99), "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": percentile(ttfts, 99)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="tiny model, few requests")
    p.add_argument("--standin", action="store_true", help="a launch-bound stand-in for a GPU "
                   "decode step (12 layers x 64 wide, vocabulary 300): the CPU no-regression "
                   "line for batching overheads that grow with the rows")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=2,
                   help="requests per client at the highest level (more at lower levels)")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--ref", default=None, metavar="FIELD=VALUE",
                   help="also the batched app with one AppArgs field set (e.g. "
                        "max_ongoing_requests=32) beside the defaults, at every level")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "bench_serve.json"))
    args = p.parse_args(argv)

    import ray
    from ray import serve

    from serve.app import AppArgs, app

    cpus = os.cpu_count() or 1
    info = machine()
    # Both apps are deployed at once, each replica with every core (torch threads = cores), and
    # the levels alternate between them, so drifting load hits both alike. Only the app being
    # measured runs; Ray is told of more CPUs so every replica can be placed.
    modes = {"batched": {"max_batch_size": 16}, "max_batch_size=1": {"max_batch_size": 1}}
    if args.ref:
        field, _, value = args.ref.partition("=")
        modes[args.ref] = {"max_batch_size": 16, field: value}
    ray.init(address="local", num_cpus=len(modes) * cpus, include_dashboard=False,
             logging_level="error")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "gpt2-124m-random"
        make_model_dir(model_dir, args.smoke_test, args.standin)
        urls = {}
        for i, (mode, given) in enumerate(modes.items()):
            serve.run(app(AppArgs(model_dir=str(model_dir), num_cpus=cpus,
                                  max_queued_requests=256, **given)),
                      name=f"bench{i}", route_prefix=f"/{i}", blocking=False)
            urls[mode] = f"http://127.0.0.1:{port}/{i}"
            health = httpx.get(f"{urls[mode]}/healthz", timeout=60).json()
            info["torch_threads"] = health["torch_threads"]
            asyncio.run(level(urls[mode], 2, 2, 16))  # warm up
        top = max(args.clients)
        for clients in args.clients:
            for mode, given in modes.items():
                # about the same number of requests at every level (>= rounds per client)
                per_client = max(args.rounds, args.rounds * top // (4 * clients))
                before = httpx.get(f"{urls[mode]}/healthz", timeout=60).json()
                r = asyncio.run(level(urls[mode], clients, per_client, args.max_tokens))
                health = httpx.get(f"{urls[mode]}/healthz", timeout=60).json()
                r.update(mode=mode, max_batch_size=given["max_batch_size"],
                         load_avg=os.getloadavg()[0],
                         recent_batch_sizes=health["batches"]["recent"][-8:],
                         **steps(before, health, r["wall_s"]))
                results.append(r)
                print(f"{mode:>17} {clients:3d} clients: {r['tokens_per_s']:7.1f} tok/s  "
                      f"p50 {r['p50_s']:6.2f} s  p99 {r['p99_s']:6.2f} s  "
                      f"TTFT p50 {r['ttft_p50_s']:5.2f} s p99 {r['ttft_p99_s']:5.2f} s  "
                      f"({r['requests']} requests, {r['rows_per_step']:.1f} rows a step, last "
                      f"{r['recent_batch_sizes']}, step {r['step_ms']:.2f} ms, gap "
                      f"{r['gap_ms']:.2f} ms, decode thread busy {100 * r['busy']:.0f} %, "
                      f"load {r['load_avg']:.1f})", flush=True)
    serve.shutdown()
    ray.shutdown()

    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch threads per replica "
          f"{info['torch_threads']}, load average at start {info['load_avg_at_start']:.1f}")
    print(f"{'clients':>7} | {'batched tok/s':>13} | {'bs=1 tok/s':>10} | {'ratio':>5} | "
          f"{'batched p50/p99 s':>17} | {'bs=1 p50/p99 s':>14} | {'batched TTFT p50/p99':>20} | "
          f"{'bs=1 TTFT p50/p99':>17}")
    summary = []
    for clients in args.clients:
        b, o = (next(r for r in results if r["clients"] == clients and r["mode"] == mode)
                for mode in ("batched", "max_batch_size=1"))
        ratio = b["tokens_per_s"] / o["tokens_per_s"]
        summary.append({"clients": clients, "throughput_ratio": ratio,
                        "batched_p99_over_p50": b["p99_s"] / b["p50_s"]})
        print(f"{clients:7d} | {b['tokens_per_s']:13.1f} | {o['tokens_per_s']:10.1f} | "
              f"{ratio:5.2f} | {b['p50_s']:7.2f} / {b['p99_s']:7.2f} | "
              f"{o['p50_s']:6.2f} / {o['p99_s']:6.2f} | {b['ttft_p50_s']:9.2f} / "
              f"{b['ttft_p99_s']:8.2f} | {o['ttft_p50_s']:7.2f} / {o['ttft_p99_s']:7.2f}")
        if args.ref:  # the defaults against the one field set
            ref = next(r for r in results if r["clients"] == clients and r["mode"] == args.ref)
            summary[-1]["vs_ref"] = b["tokens_per_s"] / ref["tokens_per_s"]
            print(f"{'':7} | {args.ref}: {ref['tokens_per_s']:.1f} tok/s, "
                  f"{ref['rows_per_step']:.1f} rows a step, TTFT p50 "
                  f"{1e3 * ref['ttft_p50_s']:.0f} ms; the defaults {b['rows_per_step']:.1f}, "
                  f"{1e3 * b['ttft_p50_s']:.0f} ms: x{summary[-1]['vs_ref']:.2f} tok/s")
    last = summary[-1]
    print(f"\ntarget at {last['clients']} clients: >= 4x throughput (got "
          f"{last['throughput_ratio']:.2f}x), p99 <= 2x p50 (got "
          f"{last['batched_p99_over_p50']:.2f}x)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "args": vars(args), "results": results,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
