"""GPT-2 model configuration: one dataclass, the published presets, and HF `config.json` I/O.

Field names follow Hugging Face's `GPT2Config` (n_embd, n_layer, ...), so a model dir written here
is a model dir transformers reads, and OpenAI's released checkpoints describe themselves in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpt2core.errors import UserError


@dataclass
class GPT2Config:
    """Shape and regularisation of a GPT-2. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_positions: int = 1024  # longest context; positions are learned, so this is fixed at init
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd, GPT-2's ratio ("rate")
    dropout: float = 0.0  # GPT-2 trained with 0.1; 0 is better for short runs and fine-tuning
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise UserError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head dimensions"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named shape (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `tiny`) with overrides."""
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # --- Hugging Face config.json ---------------------------------------------------------

    def to_hf_dict(self, eos_token_id: int | None = None) -> dict[str, Any]:
        """The `config.json` that `transformers.GPT2LMHeadModel` expects for these weights."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,  # old transformers releases read n_ctx
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "activation_function": "gelu_new",  # the tanh approximation GPT-2 was trained with
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "bos_token_id": eos_token_id,  # GPT-2 uses <|endoftext|> for both
            "eos_token_id": eos_token_id,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> GPT2Config:
        """Read a HF GPT-2 `config.json`; refuse variants whose weights compute differently."""
        if d.get("model_type") != "gpt2":
            raise UserError(f"model_type is {d.get('model_type')!r}, not 'gpt2'; "
                            "only GPT-2 model dirs load here")
        act = d.get("activation_function", "gelu_new")
        unsupported = {
            "activation_function": act not in ("gelu_new", "gelu_pytorch_tanh"),
            "scale_attn_by_inverse_layer_idx": d.get("scale_attn_by_inverse_layer_idx", False),
            "reorder_and_upcast_attn": d.get("reorder_and_upcast_attn", False),
            "scale_attn_weights": not d.get("scale_attn_weights", True),
            "tie_word_embeddings": not d.get("tie_word_embeddings", True),
        }
        for key, bad in unsupported.items():
            if bad:
                raise UserError(f"config.json sets {key}={d.get(key)!r}, "
                                "a GPT-2 variant not supported")
        return cls(
            vocab_size=d.get("vocab_size", 50257),
            n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
            n_embd=d.get("n_embd", 768),
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_inner=d.get("n_inner"),
            dropout=d.get("resid_pdrop", 0.0),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # OpenAI's four released sizes (Radford et al. 2019, table 2).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Small enough to train in minutes on a laptop CPU; vocab matches `gpt2 prepare`'s default.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, n_positions=256, vocab_size=8192),
}
