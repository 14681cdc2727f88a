"""Sample text from a model dir: an interactive session, or one prompt for scripts.

    gpt2 generate --model_path runs/shakespeare/model                  # interactive
    gpt2 generate --model_path runs/shakespeare/model --prompt "ROMEO:" --seed 1
    python pipelines/generate.py --model_path M --nucleus_prob 0.9 --temperature 0.8 --use_gpu

Interactive: type a prompt after "> "; the continuation prints token by token. Ctrl-C stops the
current generation and gives a new prompt (at the prompt it just gives a new one); Ctrl-D or
`exit` leaves. With --prompt only the generated continuation is printed to stdout, nothing
else, so the output can be piped; --seed makes it repeatable (and an interactive session's
n-th generation uses seed + n). Generation stops at the end-of-text token, after --max_tokens
new tokens (256), or when prompt plus continuation reach --seq_len tokens (default the model's
context), whichever comes first. Sampling is nucleus
(--nucleus_prob, 0.85 as in the original project), after --temperature and --top_k.
An empty prompt starts a new document (from <|endoftext|>).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpt2core.errors import UserError
from pipelines.common.entry import stage_main
from pipelines.common.flags import option, parse
from pipelines.common.modeldir import check_dtype

if TYPE_CHECKING:
    from gpt2core import GPT2, Tokenizer

PROMPT = "> "


@dataclass
class GenerateConfig:
    model_path: str | None = option(None, "the model dir to sample from (HF GPT-2 format)",
                                    required=True)
    vocab_path: str | None = option(None, "tokenizer, which must be the model's vocabulary; "
                                    "without it, the tokenizer files in --model_path")
    seq_len: int | None = option(None, "most tokens of prompt + continuation; without it "
                                 "(and at most) the model's n_positions")
    max_tokens: int = option(256, "most new tokens per generation (it also stops at the "
                             "end-of-text token and at --seq_len)")
    nucleus_prob: float = option(0.85, "nucleus (top-p) sampling: draw from the fewest tokens "
                                 "whose probability adds up to this; 1 = off",
                                 aliases=["--top_p"])
    temperature: float = option(1.0, "divides the logits before sampling; 0 = greedy")
    top_k: int = option(0, "draw from the k likeliest tokens only; 0 = off")
    use_gpu: bool = option(False, "run on the GPU (CUDA)")
    compile: bool | None = option(None, "decode steps through torch.compile, on a GPU as "
                                  "CUDA graphs: faster tokens after a one-time compile of "
                                  "tens of seconds; without it on with --use_gpu, off on CPUs")
    dtype: str | None = option(None, "weights for decoding: float32, bfloat16, int8 (CPUs: "
                               "int8 weights, per-channel scales) or auto (the best for the CPU "
                               "or GPU at hand); without it float32 on CPUs, bf16/fp16 on GPUs")
    seed: int | None = option(None, "seed for repeatable samples; without it a random one")
    prompt: str | None = option(None, "generate once from this text and print only the "
                                "continuation; without it, an interactive session")

    def __post_init__(self) -> None:
        if not self.model_path:
            raise UserError("--model_path is required: the model dir to sample from.")
        if not 0.0 < self.nucleus_prob <= 1.0:
            raise UserError(f"--nucleus_prob must be in (0, 1], got {self.nucleus_prob}.")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0, got {self.top_k}.")
        if self.max_tokens < 1:
            raise UserError(f"--max_tokens must be at least 1, got {self.max_tokens}.")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"--seq_len must be at least 2, got {self.seq_len}.")
        check_dtype(self.dtype)


class PromptTooLong(UserError):
    """The prompt leaves no room for a continuation within --seq_len."""


def load(cfg: GenerateConfig) -> tuple[GPT2, Tokenizer, int]:
    """The model on its device, its tokenizer and the length limit; raises on bad input."""
    import torch

    from gpt2core import GPT2
    from pipelines.common.modeldir import context_length, open_model

    config, tokenizer = open_model(cfg.model_path, cfg.vocab_path)
    limit = context_length(config, cfg.seq_len)
    if cfg.use_gpu and not torch.cuda.is_available():
        raise UserError("--use_gpu: no CUDA device is visible; leave --use_gpu off to run on "
                        "the CPU.")
    from gpt2core.precision import for_inference

    device = "cuda" if cfg.use_gpu else "cpu"
    if cfg.dtype:  # gpt2core/quant.py: float32, bfloat16, int8 or auto
        return GPT2.from_pretrained(cfg.model_path, device, dtype=cfg.dtype), tokenizer, limit
    model = GPT2.from_pretrained(cfg.model_path, device=device)
    return for_inference(model.eval()), tokenizer, limit  # bf16/fp16 on GPUs, as trained


def generate_text(model: GPT2, tokenizer: Tokenizer, prompt: str, cfg: GenerateConfig,
                  limit: int, seed: int, out: TextIO) -> str:
    """Write the continuation of `prompt` to `out` as it is produced; return it.

    Text is written as it becomes final (gpt2core.TextStream: a few tokens decoded per token,
    however long the continuation), so a character whose bytes span several tokens prints once
    it is complete; one the length limit cuts off is left out.
    """
    from gpt2core import TextStream, stream

    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    room = limit - len(ids)
    if room < 1:
        raise PromptTooLong(f"the prompt is {len(ids)} tokens, which leaves no room within "
                            f"--seq_len {limit}; shorten it.")
    text = TextStream(tokenizer)
    compile = cfg.compile if cfg.compile is not None else cfg.use_gpu  # on with CUDA
    for token in stream(model, ids, min(room, cfg.max_tokens), temperature=cfg.temperature,
                        top_p=cfg.nucleus_prob, top_k=cfg.top_k, eos_id=tokenizer.eos_id,
                        seed=seed, compile=compile):
        if piece := text.push(token):
            out.write(piece)
            out.flush()
    out.write(text.finish(partial=True))  # never ends inside a character
    out.flush()
    return text.text


def interactive(model: GPT2, tokenizer: Tokenizer, cfg: GenerateConfig, limit: int,
                seed: int) -> int:
    """The read-generate loop; returns the exit status (0 on Ctrl-D or `exit`)."""
    print(f"{cfg.model_path}: top_p {cfg.nucleus_prob:g}, temperature {cfg.temperature:g}"
          f"{f', top_k {cfg.top_k}' if cfg.top_k else ''}, up to {cfg.max_tokens} new tokens, "
          f"{limit} with the prompt. "
          "Ctrl-C stops a generation; Ctrl-D or `exit` leaves.", file=sys.stderr)
    turn = 0
    while True:
        try:
            prompt = input(PROMPT)
        except EOFError:  # Ctrl-D
            print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, like a shell
            print()
            continue
        if prompt.strip() == "exit":
            return 0
        sys.stdout.write(prompt)
        try:
            generate_text(model, tokenizer, prompt, cfg, limit, seed + turn, sys.stdout)
        except KeyboardInterrupt:
            sys.stdout.write("\n[stopped]")
        except PromptTooLong as e:
            print(f"\ngpt2 generate: {e}", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
        turn += 1


@stage_main("gpt2 generate")
def main(argv: list[str] | None = None) -> int:
    cfg = parse(GenerateConfig, argv, prog="gpt2 generate", description=__doc__)
    model, tokenizer, limit = load(cfg)
    seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)
    if cfg.prompt is None:
        return interactive(model, tokenizer, cfg, limit, seed)
    try:  # a prompt too long for the model: stage_main's one line
        generate_text(model, tokenizer, cfg.prompt, cfg, limit, seed, sys.stdout)
    except KeyboardInterrupt:
        return 130
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
