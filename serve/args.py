"""The Serve application's arguments: the one place that names them, their defaults and units.

`serve run serve.app:app model_dir=PATH max_batch_size=8`, config.yaml's `args:` and
`gpt2 serve --max_batch_size 8` (pipelines/serve.py builds its flags from these fields, loading
this model through the builder's type hints) all end here. Each field's docstring is its
description: the help line of its `gpt2 serve` flag and the documentation of `args:`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AppArgs(BaseModel):
    """Arguments of `serve run serve.app:app key=value ...` and of config.yaml's `args:`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model_dir: str
    """model dir to serve (Hugging Face GPT-2 format): a URI (s3://, gs://), which each replica
    downloads itself, or a local path readable on every node that runs a replica"""
    model_name: str | None = None
    """model id the API reports and accepts; None: the model dir's name, or its run's name
    when the dir is a run's `model`/`best_model`"""
    num_replicas: int | None = Field(None, ge=1)
    """replicas of the model; None keeps the deployment's setting (1, or config.yaml's)"""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs per replica; torch uses that many threads (1 when fractional)"""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per replica; 1 on GPU nodes (the replica then decodes on CUDA)"""
    dtype: str | None = Field(None, pattern="^(float32|bfloat16|int8|auto)$")
    """weights for decoding: float32, bfloat16, int8 (CPUs: int8 weights with per-channel
    scales, gpt2core/quant.py) or auto (int8 on x86 CPUs with AVX2, bf16 on CPUs with native
    bf16 and on Ampere+ GPUs); None: float32 on CPUs, bf16/fp16 on GPUs"""
    compile: str = Field("auto", pattern="^(auto|on|off)$")
    """decode steps through torch.compile (one CUDA graph per batch size, powers of two, on
    GPUs): on, off, or auto (on with CUDA, off on CPUs, where eager decoding is as fast)"""
    max_tokens_cap: int = Field(256, ge=1)
    """largest max_tokens a request may ask for, in tokens (also bounded by the context)"""
    max_batch_size: int = Field(16, ge=1)
    """rows (prompt x n) decoded together per replica; 1 turns batching off"""
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    """seconds a request to an idle replica waits for others to prefill with it; 0: none
    (later requests join the running batch at its next step, and a wait only adds to the
    time to the first token: 21 vs 42 ms with 0.02 on the CPU stand-in)"""
    body_limit: int = Field(64 * 1024, ge=1024)
    """largest request body in bytes; a bigger one gets 413"""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """requests one replica holds at once; None: 4 x max_batch_size (a full batch decoding and
    three more waiting in the replica to join as rows free up: Serve's router, once a replica
    is full, retries after a backoff of up to 0.5 s, so with 2x a batch of 16 ran 8.5 rows a
    step at 64 clients on the CPU stand-in)"""
    max_queued_requests: int = Field(64, ge=-1)
    """requests waiting for a replica before Serve answers 503 with Retry-After; -1: no limit"""
    stuck_after_s: float = Field(60.0, gt=0)
    """seconds one decode step may run before the health check fails and Serve replaces the
    replica"""

    @property
    def ongoing_requests(self) -> int:
        """max_ongoing_requests, derived from max_batch_size unless given."""
        return self.max_ongoing_requests or 4 * self.max_batch_size
