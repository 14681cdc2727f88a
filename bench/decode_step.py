"""Milliseconds per continuous-batching decode step (serve.batching.Decoder), in-process, for
the checkout at argv[1] (default: this one): GPT-2 124M shape, random weights, 1 and 16 rows,
top_p 0.9, median of 40 steps; and gpt2core.generate's tokens/s in float32, bfloat16 and int8
at batch 1 and 8 (16-token prompt, 32 new tokens, top_p 0.9, median of 3), as bench_decode
runs it. bench/serve_ab.sh runs it for two commits side by side."""

import json
import os
import sys
import time
from pathlib import Path

repo = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
sys.path.insert(0, str(repo))

import torch  # noqa: E402

from gpt2core import GPT2, GPT2Config, Tokenizer  # noqa: E402
from serve.batching import Decoder  # noqa: E402

try:  # the job's class was serve.batching.Job before issue 30's names
    from serve.batching import Generation as Job  # noqa: E402
except ImportError:
    from serve.batching import Job  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "tests/assets/gpt2")
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=1024)).eval()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog, and then it runs away.")
    ms = {}
    for rows in (1, 16):
        decoder, times = Decoder(model, tok, max_rows=16), []
        decoder.step([(i, Job(prompt, max_tokens=10_000, top_p=0.9, seed=i))
                      for i in range(rows)])
        for i in range(43):
            start = time.perf_counter()
            decoder.step()
            if i >= 3:  # warm-up steps left out
                times.append(time.perf_counter() - start)
        ms[rows] = round(1000 * sorted(times)[len(times) // 2], 1)
    from gpt2core import generate

    tok_s = {}
    for dtype in ("float32", "bfloat16", "int8"):
        torch.manual_seed(0)
        m = GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=1024)).eval()
        m = m.to_inference_dtype(dtype)
        for batch in (1, 8):
            ids = torch.randint(0, tok.vocab_size, (batch, 16))
            generate(m, ids, 4, top_p=0.9, seed=0)  # warm-up
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                generate(m, ids, 32, top_p=0.9, seed=0)
                runs.append(batch * 32 / (time.perf_counter() - start))
            tok_s[f"{dtype} b{batch}"] = round(sorted(runs)[1], 1)
    print(json.dumps({"checkout": str(repo), "ms_per_step_median": ms,
                      "generate_tok_s_median": tok_s, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
