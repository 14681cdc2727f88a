"""GPT-2 in one file.

References:
1) Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
2) OpenAI's TensorFlow release, github.com/openai/gpt-2/blob/master/src/model.py.
3) Hugging Face transformers, models/gpt2/modeling_gpt2.py (the checkpoint layout we read/write).
4) Karpathy's nanoGPT, whose layout this file follows.

Module names follow the GPT-2 checkpoint (transformer.wte, .h.{i}.attn.c_attn, ...), so
OpenAI's weights load by name; only HF's Conv1D layers store their matrices transposed
(see gpt2core/modelfile.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2core.config import GPT2Config
from gpt2core.errors import UserError


class KVCache:
    """Keys and values of past positions, allocated once, so decoding never re-allocates.

    Shapes: k, v are (n_layer, B, nh, max_len, hs). Each row's keys and values are written at
    its own positions (input_pos, kept by the caller: gpt2core/engine.py), and a pass attends
    to the first `span` columns under the mask the model builds from the positions, so stale
    columns after a row's position never matter. The shapes never change from one decoding
    step to the next, so a GPU can replay a step as one CUDA graph.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if max_len > config.n_positions:
            raise ValueError(f"cache length {max_len} exceeds n_positions={config.n_positions}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.rows = torch.arange(batch_size, device=device).unsqueeze(1)  # (B, 1)
        self.cols = torch.arange(max_len, device=device)  # (max_len,): masks from positions
        self.span = max_len  # columns a pass attends to (an engine shortens it on CPUs)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor):
        """Store this pass's (B, nh, T, hs) keys/values at input_pos (B, T) of rows [0, B);
        return what the pass attends to: their first `span` columns."""
        rows = self.rows[:input_pos.size(0)]
        self.k[layer][rows, :, input_pos] = k.transpose(1, 2)  # (B, T, nh, hs) scattered
        self.v[layer][rows, :, input_pos] = v.transpose(1, 2)
        B = input_pos.size(0)
        return self.k[layer, :B, :, :self.span], self.v[layer, :B, :, :self.span]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v, input_pos)  # (B, nh, span, hs)
        is_causal = mask is None and T > 1  # with a cache, the mask from positions is given
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 used the tanh approximation of GELU; exact GELU drifts ~1e-3 from its weights.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer, input_pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT2(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.grad_checkpointing = False  # recompute each block in backward: memory for compute
        self.loss_impl = "chunked"  # half-precision logits' loss: see choose_loss
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): the output projection is the token embedding.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer): each block adds two
        # residual branches, and this keeps the residual stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None):
        """Logits (B, T, V) for input_ids (B, T); with targets (B, T), also the mean cross-entropy.

        Targets equal to -100 are ignored in the loss. For attention_mask, kv_cache and
        input_pos see `hidden_states`.
        """
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask=attention_mask,
                                                 kv_cache=kv_cache,
                                                 input_pos=input_pos))  # (B, T, V)
        if targets is None:
            return logits
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                             self.loss_impl)
        return logits, loss

    def hidden_states(self, input_ids: torch.Tensor, *,
                      attention_mask: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None,
                      input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, C): everything but the LM head.

        Decoding needs the head for the last position only, so it applies it itself.
        attention_mask (B, T), 1 for real tokens and 0 for padding (Hugging Face's
        convention): left padding is then invisible, positions count real tokens only and no
        real token attends to a pad. With a kv_cache, input_pos (B, T) gives each token's
        position instead, kept by the caller (gpt-fast's way: gpt2core/engine.py): a token
        sees the cached positions up to its own and nothing after.
        """
        B, T = input_ids.size()
        mask = None
        if kv_cache is not None:
            if input_pos is None:
                raise ValueError("a kv_cache needs input_pos, each token's position")
            pos = input_pos
            cols = kv_cache.cols[:kv_cache.span]
            mask = (cols <= input_pos.unsqueeze(-1)).unsqueeze(1)  # (B, 1, T, span)
        elif T > self.config.n_positions:
            raise UserError(f"sequence of {T} tokens exceeds n_positions="
                            f"{self.config.n_positions}; shorten the input")
        elif attention_mask is None:
            pos = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        else:
            attention_mask = attention_mask.to(torch.bool)
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            mask = _padded_causal_mask(attention_mask)  # (B, 1, T, T)

        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask, kv_cache, i, input_pos)
        return self.transformer.ln_f(x)

    # --- Sizes and speed --------------------------------------------------------------------

    def set_dropout(self, p: float) -> None:
        """Use dropout rate p everywhere (embeddings, attention weights, residuals): a model
        loaded for fine-tuning otherwise keeps the rate it was saved with."""
        self.config.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention):
                m.dropout = p

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (the tied wte/lm_head counted once); optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·d·T (PaLM, appendix B)."""
        T = seq_len or self.config.n_positions
        c = self.config
        # wte counts (it is also the LM head's matmul); wpe is a lookup, not a matmul.
        n = self.num_params() - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float,
                     seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
        return tokens_per_sec * self.flops_per_token(seq_len) / peak_flops

    # --- Optimizer ----------------------------------------------------------------------------

    def configure_optimizer(self, lr: float, weight_decay: float,
                            betas: tuple[float, float] = (0.9, 0.95),
                            fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW with decay on matrices only: biases, LayerNorms and embeddings are exempt."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if p.dim() >= 2 and "wte" not in n and "wpe" not in n]
        no_decay = [p for n, p in params.items() if not (p.dim() >= 2 and "wte" not in n
                                                          and "wpe" not in n)]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:  # the fused kernel exists for CUDA and (since torch 2.4) CPU
            fused = True
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # --- Model dirs (Hugging Face GPT-2 format; see modelfile.py) ------------------------------

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu",
                        dtype: str = "float32") -> GPT2:
        """Load a HF GPT-2 model dir (ours, transformers', or OpenAI's converted weights).

        dtype "float32" (the weights as trained), or for inference "bfloat16", "int8" (CPU)
        or "auto" (the fastest on this device): see `to_inference_dtype`.
        """
        from gpt2core import modelfile

        config = modelfile.read_config(path)
        model = cls(config)
        model.load_state_dict(modelfile.read_weights(path, state_shapes(config)), strict=True)
        return model.to(device).to_inference_dtype(dtype)

    def to_inference_dtype(self, dtype: str) -> GPT2:
        """Convert this float32 model in place for inference and return it.

        "float32" changes nothing (training is unchanged); "bfloat16" casts every parameter;
        "int8" quantizes the blocks' linear layers and the LM head (CPU); "auto" picks by the
        rule in gpt2core/quant.py. The KV cache follows (float32 for int8). Not for training.
        """
        from gpt2core.quant import to_inference_dtype

        return to_inference_dtype(self, dtype)

    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        """Write a HF GPT-2 model dir: config.json, model.safetensors and the tokenizer files."""
        from gpt2core import modelfile

        modelfile.write_model_dir(path, self.config, self.state_dict(), tokenizer)


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) over targets (N,) != -100, as F.cross_entropy.

    Why not F.cross_entropy: its backward zero-fills an (N, V) gradient, scatters into it, then
    runs log_softmax's backward over two more (N, V) tensors. With a 50k vocabulary those
    tensors are most of a small model's memory traffic. Here the forward keeps only the
    log-sum-exp per row, and the backward is softmax - one_hot, built in one buffer.

    bf16/fp16 logits (autocast) are kept as they are, never as a full fp32 (N, V) copy: the
    log-sum-exp and the softmax are computed in fp32 a chunk of rows at a time (CHUNK
    elements), and the gradient is written in the logits' dtype.
    """

    CHUNK = 1 << 24  # elements of fp32 scratch per chunk: 64 MB, ~330 rows of a 50k vocabulary

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.cat([torch.logsumexp(logits[rows].to(compute), dim=-1)
                         for rows in _row_chunks(logits)])  # (N,)
        valid = targets != -100
        safe = targets.clamp(min=0)  # ignored rows point at token 0, then are masked out
        target_logit = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(compute)  # (N,)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(logits, lse, safe, valid, count)
        return ((lse - target_logit) * valid).sum() / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        logits, lse, safe, valid, count = ctx.saved_tensors
        scale = (grad_loss / count * valid).to(lse.dtype).unsqueeze(-1)  # (N, 1)
        grad = torch.empty_like(logits)
        in_place = logits.dtype == lse.dtype  # fp32 (or fp64) logits: no scratch at all
        for rows in _row_chunks(logits):
            part = torch.sub(logits[rows].to(lse.dtype), lse[rows].unsqueeze(-1),
                             out=grad[rows] if in_place else None).exp_()  # softmax
            part.scatter_add_(-1, safe[rows].unsqueeze(-1),
                              torch.full_like(part[:, :1], -1.0))  # - one_hot
            part.mul_(scale[rows])
            if not in_place:
                grad[rows] = part  # to the logits' dtype
        return grad, None


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Row slices of logits (N, V) with about _CrossEntropy.CHUNK elements each."""
    n, v = logits.shape
    step = max(1, _CrossEntropy.CHUNK // max(1, v))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  impl: str = "chunked") -> torch.Tensor:
    """Mean next-token loss, logits (N, V) and targets (N,); targets equal to -100 are ignored
    (all of them ignored: 0). impl "torch": PyTorch's own, on an fp32 copy of the logits (what
    autocast gives it); "chunked": _CrossEntropy for bf16/fp16 logits. fp32 logits, or a graph
    torch.compile traces, always take PyTorch's: there is no half-precision copy to save, and
    AOT autograd cannot rebuild the views a custom Function saves (compile after DDP failed)."""
    if impl == "torch" or logits.dtype == torch.float32 or torch.compiler.is_compiling():
        nll = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
        return nll / (targets != -100).sum().clamp(min=1)
    return _CrossEntropy.apply(logits, targets)


LOSS_BYTES = 12  # per logit, what PyTorch's loss adds on half logits: an fp32 copy, its
#                  log-softmax and its gradient (the chunked one adds ~0: CHUNK rows at a time)


def choose_loss(rows: int, vocab: int, dtype: torch.dtype | None,
                free_bytes: int | None) -> str:
    """The cross-entropy a training step runs on (rows, vocab) logits of `dtype`: "torch"
    (PyTorch's) wherever its extra LOSS_BYTES per logit take at most a quarter of the device's
    free memory, else "chunked": PyTorch's is the faster one (issue 27 from a GPU session;
    bench/bench_loss.py on CPUs), the chunked one is kept for where the copies would not fit
    (a large vocabulary or batch on a small GPU). fp32 logits: PyTorch's (no copy)."""
    if dtype in (None, torch.float32):
        return "torch"
    if free_bytes is None:
        return "chunked"
    return "torch" if rows * vocab * LOSS_BYTES <= free_bytes // 4 else "chunked"


def state_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of GPT2(config)'s state dict with its shape: what a model dir's weights must
    hold (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in GPT2(config).state_dict().items()}


def _padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T): query i sees key j if j <= i and j is not padding.

    Every query also sees itself, so a pad query (whose output is never used) has one key
    and softmax never divides by zero.
    """
    T = attention_mask.size(1)
    pos = torch.arange(T, device=attention_mask.device)
    causal = pos.unsqueeze(0) <= pos.unsqueeze(1)  # (T, T): key <= query
    mask = (causal.unsqueeze(0) & attention_mask[:, None, :]) | torch.eye(
        T, dtype=torch.bool, device=attention_mask.device)  # (B, T, T)
    return mask.unsqueeze(1)  # (B, 1, T, T)
