"""Decode speed on CPU, side by side in one run: gpt2core in each dtype, transformers, CTranslate2.

Engines, all holding the same weights (GPT-2 124M shape, random init: speed does not depend on
the values; no pretrained weights are available offline):
  gpt2core float32 / bfloat16 / int8  `GPT2` converted by `to_inference_dtype`, `gpt2core.generate`
  transformers float32                 `GPT2LMHeadModel.generate(do_sample=True)` on our saved dir
  CTranslate2 float32 / int8           that dir converted by `TransformersConverter`, loaded with
                                       compute_type "float32" / "int8" (CTranslate2's own
                                       weight quantization), `Generator.generate_batch`
Task: a prompt of 16 random tokens, 128 new tokens (no early stop), nucleus sampling (top_p 0.9,
top_k off, temperature 1), batch 1 and 8; tokens/s = batch * new tokens / seconds.

Method: every engine warms up, then each round runs every engine once, in an order rotated per
round, and the median over rounds is compared, so a busy neighbour on a shared machine slows
all engines alike. The load average is recorded per round. Also measured: the memory read
bandwidth (sum over a 512 MB tensor), the bytes of weights each dtype reads per token and so
the batch-1 limit (bandwidth / bytes), and with --profile the top operators of one decode step.

Targets (issue 19): gpt2core's best dtype >= 1.0x CTranslate2 int8 at batch 1 and 8;
gpt2core float32 >= 1.2x CTranslate2 float32.

Run (needs the bench extra: pip install -e '.[bench]'):
    .venv/bin/python bench/bench_decode.py                 # ~10 min on 2 busy cores
    .venv/bin/python bench/bench_decode.py --quick         # 32 tokens, 2 rounds
    .venv/bin/python bench/bench_decode.py --engines gpt2core-int8 ct2-int8 --profile
It prints a table and writes JSON (default bench/results/bench_decode.json) naming the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from machine import machine_info, write_results  # noqa: E402  (bench/machine.py)

from gpt2core import GPT2, GPT2Config, generate  # noqa: E402
from gpt2core.quant import resolve_dtype  # noqa: E402
from gpt2core.sampling import decode_head, sample  # noqa: E402

ENGINES = ("gpt2core-float32", "gpt2core-bfloat16", "gpt2core-int8", "transformers-float32",
           "ct2-float32", "ct2-int8")
PROMPT_LEN, TOP_P = 16, 0.9


def build(engines: list[str], work: Path, threads: int) -> tuple[dict, GPT2]:
    """Callables (prompt (B, T) long, n) -> None for each engine, and the float32 model."""
    torch.manual_seed(0)
    ours = GPT2(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                           vocab_size=50257)).eval()
    runners = {}
    for name in engines:
        if name.startswith("gpt2core-"):
            dtype = name.split("-")[1]
            model = ours if dtype == "float32" else copy.deepcopy(ours).to_inference_dtype(dtype)
            runners[name] = _gpt2core_runner(model)
    if any(e.startswith(("transformers", "ct2")) for e in engines):
        hf_dir = save_hf_dir(ours, work / "hf")
    if "transformers-float32" in engines:
        runners["transformers-float32"] = _hf_runner(hf_dir)
    ct2 = [e for e in engines if e.startswith("ct2-")]
    if ct2:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter

        out = TransformersConverter(str(hf_dir)).convert(str(work / "ct2"), force=True)
        for name in ct2:
            gen = ctranslate2.Generator(out, device="cpu", compute_type=name.split("-")[1],
                                        intra_threads=threads, inter_threads=1)
            runners[name] = _ct2_runner(gen)
    return runners, ours


def save_hf_dir(ours: GPT2, path: Path) -> Path:
    """Our weights as a transformers-written dir, with a word-level tokenizer of token names
    t0..t50255 (CTranslate2 reads the vocabulary from the tokenizer; ids are all we use)."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    ours.save_pretrained(path / "ours")
    GPT2LMHeadModel.from_pretrained(path / "ours").save_pretrained(path)
    vocab = {f"t{i}": i for i in range(50256)} | {"<|endoftext|>": 50256}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                  eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.save_pretrained(path)
    return path


def _gpt2core_runner(model: GPT2):
    def run(prompt: torch.Tensor, n: int) -> None:
        rows = generate(model, prompt, n, temperature=1.0, top_p=TOP_P, top_k=0, seed=0)
        assert [len(r) for r in rows] == [n] * len(prompt), "gpt2core stopped early"
    return run


def _hf_runner(hf_dir: Path):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()

    def run(prompt: torch.Tensor, n: int) -> None:
        torch.manual_seed(0)
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                          temperature=1.0, top_p=TOP_P, top_k=0, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0)
        assert out.shape == (len(prompt), prompt.size(1) + n), "transformers: wrong length"
    return run


def _ct2_runner(gen):
    def run(prompt: torch.Tensor, n: int) -> None:
        tokens = [[f"t{i}" for i in row] for row in prompt.tolist()]
        res = gen.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=0,
                                 sampling_topp=TOP_P, sampling_temperature=1.0,
                                 include_prompt_in_result=False)
        assert [len(r.sequences_ids[0]) for r in res] == [n] * len(prompt), "ct2: wrong length"
    return run


def bench_batch(runners: dict, batch: int, new_tokens: int, rounds: int) -> dict:
    """Median tokens/s per engine over rounds that each run every engine once (order rotated)."""
    prompt = torch.randint(0, 50256, (batch, PROMPT_LEN),
                           generator=torch.Generator().manual_seed(2))
    names = list(runners)
    rates: dict[str, list[float]] = {n: [] for n in names}
    loads = []
    with torch.inference_mode():
        for name in names:
            runners[name](prompt, 8)  # warm up (allocations, packing, thread pools)
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                runners[name](prompt, new_tokens)
                rates[name].append(batch * new_tokens / (time.perf_counter() - t0))
    med = {n: statistics.median(v) for n, v in rates.items()}
    return {"batch": batch, "new_tokens": new_tokens, "prompt_len": PROMPT_LEN,
            "tok_s": med, "rounds_tok_s": rates, "load_avg_per_round": loads}


def weight_bytes_per_token(config: GPT2Config) -> dict[str, float]:
    """Bytes of weight matrices one decode step reads, per dtype (biases, LayerNorms ~0.1 %)."""
    c = config
    per_layer = (3 * c.n_embd + c.n_embd + 2 * c.n_inner) * c.n_embd  # c_attn, c_proj, MLP
    matrices = c.n_layer * per_layer + c.vocab_size * c.n_embd  # + the LM head
    scales = c.n_layer * (5 * c.n_embd + c.n_inner) + c.vocab_size  # int8: float32 per row
    return {"float32": 4.0 * matrices, "bfloat16": 2.0 * matrices,
            "int8": 1.0 * matrices + 4.0 * scales}


def read_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s a sum over an mb-MB float32 tensor reads (best of repeats), all torch threads."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    best = min(_timed(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def profile_step(model: GPT2, batch: int, steps: int = 4, top: int = 8) -> list[dict]:
    """The top operators (self CPU ms per step) of decode steps after a 16-token prompt."""
    from torch.profiler import ProfilerActivity, profile

    from gpt2core import KVCache

    prompt = torch.randint(0, 50256, (batch, PROMPT_LEN))
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, batch, PROMPT_LEN + steps + 2, dtype=dtype)
    head = decode_head(model)

    def step(ids: torch.Tensor) -> torch.Tensor:
        h = model.hidden_states(ids, kv_cache=cache)
        return sample(h[:, -1] @ head, top_p=TOP_P)[:, None]

    with torch.inference_mode():
        nxt = step(step(prompt))  # prefill and one step (weights packed) outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                nxt = step(nxt)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count // steps,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


def ratios(tok_s: dict[str, float]) -> dict[str, float]:
    """The comparisons the targets name, where both engines ran."""
    out = {}
    ours = {k: v for k, v in tok_s.items() if k.startswith("gpt2core-")}
    for theirs in ("ct2-int8", "ct2-float32", "transformers-float32"):
        for name, rate in ours.items():
            if theirs in tok_s:
                out[f"{name} / {theirs}"] = rate / tok_s[theirs]
    if ours and "ct2-int8" in tok_s:
        best = max(ours, key=ours.get)
        out[f"best ({best}) / ct2-int8"] = ours[best] / tok_s["ct2-int8"]
    return out


TARGETS = {"best": ("ct2-int8", 1.0), "gpt2core-float32": ("ct2-float32", 1.2)}


def print_results(results: dict) -> None:
    for r in results["decode"]:
        print(f"\nbatch {r['batch']}, {r['new_tokens']} new tokens, load "
              f"{min(r['load_avg_per_round']):.1f}-{max(r['load_avg_per_round']):.1f}")
        print(f"{'engine':<22} {'tok/s':>8} {'rounds':>24}")
        for name, rate in r["tok_s"].items():
            rounds = " ".join(f"{x:.1f}" for x in r["rounds_tok_s"][name])
            print(f"{name:<22} {rate:>8.1f} {rounds:>24}")
        for label, ratio in r["ratios"].items():
            print(f"  {label:<44} {ratio:5.2f}x")
    lim = results["limit"]
    print(f"\nread bandwidth {lim['read_GB_s']:.1f} GB/s; batch-1 limit (bandwidth / weight bytes "
          "per token) and share reached:")
    for dtype, d in lim["per_dtype"].items():
        print(f"  {dtype:<9} {d['MB_per_token']:7.0f} MB/token  limit {d['limit_tok_s']:6.1f} "
              f"tok/s  gpt2core {d.get('share_gpt2core', float('nan')):4.0%}  "
              f"ct2 {d.get('share_ct2', float('nan')):4.0%}")
    for name, ops in results.get("profile", {}).items():
        print(f"\nprofile of one decode step, {name}:")
        for op in ops:
            print(f"  {op['op'][:48]:<48} {op['ms']:7.2f} ms/step {op['share']:4.0%}"
                  f"  x{op['calls']}")
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags'])}, torch "
          f"{m['torch']} ({m['torch_threads']} threads), ctranslate2 {m.get('ctranslate2')}, "
          f"auto -> {m['auto_dtype']}, {m['date']}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES),
                   help="which engines to run (default: all)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated per run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every engine once")
    p.add_argument("--quick", action="store_true", help="32 tokens, 2 rounds")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch and CTranslate2 threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one decode step of each gpt2core dtype at batch 1")
    p.add_argument("--json", default="bench/results/bench_decode.json", help="where to write JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    extra = {}
    try:
        import ctranslate2

        extra["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        if any(e.startswith("ct2-") for e in args.engines):
            sys.exit("CTranslate2 is not installed: pip install -e '.[bench]' (or ctranslate2)")
    import transformers

    results: dict = {"machine": machine_info(torch_threads=args.threads,
                                             transformers=transformers.__version__,
                                             auto_dtype=resolve_dtype("auto"), **extra),
                     "engines": args.engines, "targets": TARGETS, "decode": []}
    with tempfile.TemporaryDirectory() as tmp:
        print("building engines ...", flush=True)
        runners, ours = build(args.engines, Path(tmp), args.threads)
        for batch in args.batches:
            print(f"decode: batch {batch} ...", flush=True)
            r = bench_batch(runners, batch, args.new_tokens, args.rounds)
            r["ratios"] = ratios(r["tok_s"])
            results["decode"].append(r)
    del runners
    bandwidth = read_bandwidth()
    per_dtype = {}
    first = next((r for r in results["decode"] if r["batch"] == 1), None)
    for dtype, nbytes in weight_bytes_per_token(ours.config).items():
        d = {"MB_per_token": nbytes / 1e6, "limit_tok_s": bandwidth / nbytes}
        if first and f"gpt2core-{dtype}" in first["tok_s"]:
            d["share_gpt2core"] = first["tok_s"][f"gpt2core-{dtype}"] / d["limit_tok_s"]
        if first and f"ct2-{dtype}" in first["tok_s"]:
            d["share_ct2"] = first["tok_s"][f"ct2-{dtype}"] / d["limit_tok_s"]
        per_dtype[dtype] = d
    results["limit"] = {"read_GB_s": bandwidth / 1e9, "per_dtype": per_dtype}
    if args.profile:
        results["profile"] = {}
        for name in [e for e in args.engines if e.startswith("gpt2core-")]:
            dtype = name.split("-")[1]
            model = ours if dtype == "float32" else copy.deepcopy(ours).to_inference_dtype(dtype)
            results["profile"][f"{name} batch 1"] = profile_step(model, 1)
    results["machine"]["load_avg_at_end"] = os.getloadavg()[0]
    print_results(results)
    write_results(results, args.json)


if __name__ == "__main__":
    main()
