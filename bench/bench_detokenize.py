"""Host time per decode step spent turning tokens into text (gpt2core.TextStream), for
rows of a given length, this checkout beside an older commit's TextStream in one run.

    .venv/bin/python bench/bench_detokenize.py            # against c7b008c (whole-text decode)
    .venv/bin/python bench/bench_detokenize.py --ref REF --rows 64

Every row of a Serve batch pushes one token per step on the decode thread, between one step's
host read and the next step's launch; on a GPU, where a CUDA-graph step takes milliseconds,
that host time is part of every step. GPT-2's tokenizer, Shakespeare's text as the tokens;
for each length the median of 5 rounds of `--rows` rows pushing 16 tokens at that length.
Prints a table and writes JSON (default bench/results/detokenize.json) naming the machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def text_stream_at(ref: str) -> type:
    """TextStream as commit `ref` had it: gpt2core/detokenize.py, serve/batching.py before."""
    for path in ("gpt2core/detokenize.py", "serve/batching.py"):
        shown = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True,
                               text=True)
        if shown.returncode == 0 and "class TextStream" in shown.stdout:
            module = sys.modules[f"text_stream_{ref}"] = types.ModuleType(f"text_stream_{ref}")
            exec(compile(shown.stdout, f"{ref}:{path}", "exec"), module.__dict__)
            return module.TextStream
    raise SystemExit(f"commit {ref} has no TextStream; give --ref a commit from c7b008c on.")


def ms_per_step(stream: type, tok, ids: list[int], length: int, rows: int) -> float:
    """Host ms for `rows` rows each pushing one token, with `length` tokens before it."""
    rounds = []
    for _ in range(5):
        streams = []
        for _ in range(rows):
            s = stream(tok)
            for i in ids[:length - 16]:
                s.push(i)
            streams.append(s)
        start = time.perf_counter()
        for i in ids[length - 16:length]:
            for s in streams:
                s.push(i)
        rounds.append((time.perf_counter() - start) / 16 * 1e3)
    return statistics.median(rounds)


def main() -> None:
    from machine import machine_info, write_results

    from gpt2core import TextStream, Tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", default="c7b008c", help="the commit to compare with")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "detokenize.json"))
    args = p.parse_args()
    tok = Tokenizer.from_pretrained(ROOT / "tests" / "assets" / "gpt2")
    text = (ROOT.parent / "shared" / "data" / "tinyshakespeare.txt").read_text()[:40_000]
    ids = tok.encode(text)
    old = text_stream_at(args.ref)
    results = []
    print(f"{args.rows} rows, host ms per step   this checkout   {args.ref}   ratio (old/new)")
    for length in (64, 256, 1024):
        new_ms = ms_per_step(TextStream, tok, ids, length, args.rows)
        old_ms = ms_per_step(old, tok, ids, length, args.rows)
        results.append({"length": length, "rows": args.rows, "ms": new_ms,
                        "ref_ms": old_ms, "speedup": old_ms / new_ms})
        print(f"  at {length:>4} tokens a row      {new_ms:>8.2f}   {old_ms:>8.2f}   "
              f"x{old_ms / new_ms:.1f}")
    write_results({"machine": machine_info(ref=args.ref), "steps": results}, args.json)


if __name__ == "__main__":
    main()
