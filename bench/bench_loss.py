"""The training step with each cross-entropy: PyTorch's (on an fp32 copy of the logits) against
the chunked one (gpt2core.model._CrossEntropy), side by side in one run.

    .venv/bin/python bench/bench_loss.py                      # bf16 autocast, vocab 8192, 50304
    .venv/bin/python bench/bench_loss.py --device cuda --layers 12 --dims 768 --seq 1024

The same model (4 layers, 128 wide by default), batch and data in two TrainStates, one with each
loss; rounds alternate between them and the medians are compared. This is the measurement
behind gpt2core.model.choose_loss: where the fp32 copies fit, PyTorch's. Prints a table and
writes JSON (default bench/results/loss.json) naming the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def measure(vocab: int, args) -> dict:
    import torch

    from gpt2core import GPT2, GPT2Config
    from gpt2core.training import TrainState, rows_to_batch

    def state(loss: str) -> TrainState:
        torch.manual_seed(0)
        model = GPT2(GPT2Config(vocab_size=vocab, n_positions=args.seq, n_embd=args.dims,
                                n_layer=args.layers, n_head=max(1, args.dims // 32)))
        s = TrainState.create(model, lr=1e-3, weight_decay=0.01, warmup_steps=2,
                              total_steps=1000, min_lr=None, device=args.device,
                              precision=args.precision)
        s.step(batch, 1.0)  # the first step chooses; then the implementation is forced
        s.raw.loss_impl = loss
        s.step(batch, 1.0)
        return s

    ids = torch.randint(0, vocab, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0))
    batch = [rows_to_batch(ids, None, args.seq)]
    states = {"torch": state("torch"), "chunked": state("chunked")}
    times: dict[str, list[float]] = {k: [] for k in states}
    for _ in range(args.rounds):
        for name, s in states.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                loss, _ = s.step(batch, 1.0)
            float(loss)  # waits for the device
            times[name].append((time.perf_counter() - start) / args.steps)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {"vocab": vocab, "torch_ms": ms["torch"], "chunked_ms": ms["chunked"],
            "torch_speedup": ms["chunked"] / ms["torch"],
            "chosen": _chosen(states["torch"], batch)}


def _chosen(state, batch) -> str:
    from gpt2core.model import choose_loss
    from gpt2core.training import free_memory

    return choose_loss(batch[0][0].numel(), state.raw.config.vocab_size, state.dtype,
                       free_memory(state.device))


def main(argv: list[str] | None = None) -> int:
    from machine import machine_info, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", help="bf16 or fp16 (fp32 has no copy)")
    p.add_argument("--vocab", type=int, nargs="+", default=[8192, 50304])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dims", type=int, default=128)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "loss.json"))
    args = p.parse_args(argv)
    rows = [measure(v, args) for v in args.vocab]
    print(f"{'vocab':>7} {'torch ms':>9} {'chunked ms':>11} {'torch speed':>12}  chosen")
    for r in rows:
        print(f"{r['vocab']:>7} {r['torch_ms']:>9.1f} {r['chunked_ms']:>11.1f} "
              f"{r['torch_speedup']:>11.3f}x  {r['chosen']}")
    write_results({"machine": machine_info(device=args.device), "args": vars(args),
                   "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
