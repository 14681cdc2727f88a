"""Benchmark gpt2core against Hugging Face transformers on this machine: training and decoding.

What it measures, side by side in one process, with the same weights, data and settings:

1. Training step (forward + backward + AdamW step), tokens/s, for a small model
   (4 layers, 4 heads, 128 dims, context 64, batch 12) and GPT-2 124M (12/12/768, context 256,
   batch 4). Ours: `model(x, targets=y)` with y = x shifted by one, `model.configure_optimizer`
   (fused AdamW, decay on matrices except the embeddings). Hugging Face: `GPT2LMHeadModel` loaded
   from our weights (`save_pretrained` / `from_pretrained`), loss via `labels=` (shifted inside),
   and the optimizer its Trainer builds by default: with torch >= 2.8 `TrainingArguments.optim`
   defaults to "adamw_torch_fused", i.e. `torch.optim.AdamW(fused=True)`, with decay on everything
   but biases and LayerNorms. Both: dropout 0, lr 6e-4, weight decay 0.1, betas (0.9, 0.95).
   Method: warm up, then interleave rounds (ours k steps, theirs k steps, r times) and compare the
   median per-round tokens/s, so drifting clocks and noisy neighbours hit both sides alike.
   (On a shared VM the speed of the whole machine can change several-fold from minute to minute:
   compare the ratios, and the absolute numbers only within one run.)
2. Decode, tokens/s, GPT-2 124M (random weights, shared), prompt of 16 random tokens, 128 new
   tokens, nucleus sampling (top_p 0.9, top_k off, temperature 1), batch 1 and 8: ours
   `gpt2core.generate` vs `GPT2LMHeadModel.generate(do_sample=True, min_new_tokens=128)` (so
   neither stops early), both under `torch.inference_mode`. tokens/s = batch * new tokens / time.

Targets (ours / transformers): training >= 1.15x, decode >= 1.5x at batch 1 and >= 1.2x at batch 8.

Run:
    .venv/bin/python bench/bench_model.py            # full, ~10 min on 2 CPU cores
    .venv/bin/python bench/bench_model.py --quick    # fewer steps and tokens, ~2 min
    .venv/bin/python bench/bench_model.py --only decode --threads 1 --json /tmp/b.json
It prints a table and writes JSON (default bench/results/bench_model.json) naming the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from machine import machine_info, write_results  # noqa: E402  (bench/machine.py)

from gpt2core import GPT2, GPT2Config, generate  # noqa: E402

LR, WEIGHT_DECAY, BETAS = 6e-4, 0.1, (0.9, 0.95)
TARGETS = {"train": 1.15, "decode/1": 1.5, "decode/8": 1.2}


@dataclass
class TrainCase:
    name: str
    n_layer: int
    n_head: int
    n_embd: int
    seq_len: int
    batch: int
    steps: int  # k: steps per round for each side
    rounds: int  # r: interleaved rounds
    warmup: int


def machine() -> dict:
    import transformers

    return machine_info(torch_threads=torch.get_num_threads(),
                        transformers=transformers.__version__)


def make_pair(n_layer: int, n_head: int, n_embd: int):
    """Our GPT2 and a transformers GPT2LMHeadModel holding the same weights, dropout off."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT2(GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
                           vocab_size=50257, dropout=0.0))
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        hf_config = HFConfig.from_pretrained(tmp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        hf = GPT2LMHeadModel.from_pretrained(tmp, config=hf_config)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight), "weights differ"
    assert hf.lm_head.weight is hf.transformer.wte.weight, "transformers did not tie lm_head"
    return ours, hf


def hf_trainer_optimizer(hf) -> torch.optim.AdamW:
    """What `transformers.Trainer` builds by default (optim "adamw_torch_fused" on torch >= 2.8).

    Trainer decays every parameter except biases and LayerNorm weights; in GPT-2 those are
    exactly the 1-D tensors.
    """
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=LR, betas=BETAS, fused=True)


def bench_train(case: TrainCase) -> dict:
    ours, hf = make_pair(case.n_layer, case.n_head, case.n_embd)
    ours.train()
    hf.train()
    opt_ours = ours.configure_optimizer(LR, WEIGHT_DECAY, betas=BETAS)
    opt_hf = hf_trainer_optimizer(hf)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 50257, (case.batch, case.seq_len + 1), generator=g)
               for _ in range(4)]
    T = case.seq_len

    def step_ours(i: int) -> float:
        data = batches[i % len(batches)]
        _, loss = ours(data[:, :T], targets=data[:, 1:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf(i: int) -> float:
        data = batches[i % len(batches)][:, :T]
        loss = hf(input_ids=data, labels=data).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss.item()

    first = (step_ours(0), step_hf(0))  # same weights and data: the first losses should agree
    for i in range(1, case.warmup):
        step_ours(i)
        step_hf(i)
    tokens = case.batch * T * case.steps
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    for r in range(case.rounds):
        for side, step in (("ours", step_ours), ("hf", step_hf)):
            t0 = time.perf_counter()
            for i in range(case.steps):
                step(r * case.steps + i)
            rates[side].append(tokens / (time.perf_counter() - t0))
    ours_med, hf_med = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    return {"case": case.__dict__, "first_loss": {"ours": first[0], "hf": first[1]},
            "rounds_tok_s": rates, "ours_tok_s": ours_med, "hf_tok_s": hf_med,
            "ratio": ours_med / hf_med, "target": TARGETS["train"]}


def bench_decode(ours, hf, batch: int, new_tokens: int, rounds: int) -> dict:
    prompt = torch.randint(0, 50257, (batch, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)

    def run_ours(n: int) -> None:
        rows = generate(ours, prompt, n, temperature=1.0, top_p=0.9, top_k=0, eos_id=None, seed=0)
        assert [len(row) for row in rows] == [n] * batch, "ours stopped early or ran long"

    def run_hf(n: int) -> None:
        torch.manual_seed(0)
        out = hf.generate(prompt, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.9,
                          top_k=0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        assert out.shape == (batch, 16 + n), f"transformers returned {tuple(out.shape)}"

    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    with torch.inference_mode():
        run_ours(8)  # warm up
        run_hf(8)
        for _ in range(rounds):
            for side, fn in (("ours", run_ours), ("hf", run_hf)):
                t0 = time.perf_counter()
                fn(new_tokens)
                rates[side].append(batch * new_tokens / (time.perf_counter() - t0))
    ours_med, hf_med = statistics.median(rates["ours"]), statistics.median(rates["hf"])
    return {"batch": batch, "new_tokens": new_tokens, "prompt_len": 16, "rounds_tok_s": rates,
            "ours_tok_s": ours_med, "hf_tok_s": hf_med, "ratio": ours_med / hf_med,
            "target": TARGETS[f"decode/{batch}"]}


def print_table(results: dict) -> None:
    print(f"\n{'benchmark':<34} {'ours tok/s':>11} {'HF tok/s':>11} {'ratio':>7} {'target':>7}")
    print("-" * 74)
    rows = [(f"train {r['case']['name']}", r) for r in results.get("train", [])]
    rows += [(f"decode 124M batch {r['batch']} ({r['new_tokens']} tok)", r)
             for r in results.get("decode", [])]
    for label, r in rows:
        ok = "ok" if r["ratio"] >= r["target"] else "MISS"
        print(f"{label:<34} {r['ours_tok_s']:>11.1f} {r['hf_tok_s']:>11.1f} "
              f"{r['ratio']:>6.2f}x {r['target']:>5.2f}x  {ok}")
    m = results["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
          f"transformers {m['transformers']}, {m['date']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps, rounds and decode tokens")
    p.add_argument("--json", default="bench/results/bench_model.json", help="where to write JSON")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch.set_num_threads (default: all cores)")
    p.add_argument("--only", choices=["train", "decode"],
                   help="run only the training or the decode benchmark")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # transformers' generate() warns that the model's generation config was changed by kwargs
    # and about sampling knobs; the settings here are deliberate.
    warnings.filterwarnings("ignore", module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. "`loss_type=None` was set in the config ..."
    hf_logging.disable_progress_bar()  # "Loading weights" bars from from_pretrained

    q = args.quick
    results: dict = {"machine": machine(), "quick": q}
    if args.only in (None, "train"):
        cases = [TrainCase("small 4L/128d T64 B12", 4, 4, 128, 64, 12,
                           steps=3 if q else 10, rounds=3 if q else 5, warmup=3),
                 TrainCase("124M T256 B4", 12, 12, 768, 256, 4,
                           steps=1 if q else 2, rounds=3 if q else 5, warmup=1)]
        results["train"] = []
        for case in cases:
            print(f"training: {case.name} ...", flush=True)
            results["train"].append(bench_train(case))
    if args.only in (None, "decode"):
        ours, hf = make_pair(12, 12, 768)
        ours.eval()
        hf.eval()
        results["decode"] = []
        for batch in (1, 8):
            print(f"decode: batch {batch} ...", flush=True)
            results["decode"].append(bench_decode(ours, hf, batch, new_tokens=32 if q else 128,
                                                  rounds=2 if q else 5))
    print_table(results)
    write_results(results, args.json)


if __name__ == "__main__":
    main()
