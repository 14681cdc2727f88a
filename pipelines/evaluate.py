"""Evaluate a model dir: loss, perplexity, bits per byte and next-token accuracy (Ray Data).

    python pipelines/evaluate.py --model_path runs/shakespeare/model --eval_corpus val.txt
    ray job submit --working-dir . -- python pipelines/evaluate.py --model_path /models/m \
        --eval_corpus s3://bucket/val/
    gpt2 evaluate --model_path runs/shakespeare/model --eval_corpus data/dataset --json
    gpt2 evaluate --model_path M --eval_corpus val.jsonl --mlflow_run_id RUN   # log to that run
    python pipelines/evaluate.py --smoke-test   # a tiny model, Ray and in-process, compared

--eval_corpus is text (read as `gpt2 prepare` reads it: pipelines/text/corpus.py) or a dataset
dir (its val split). A text document is scored as <eos> document <eos>: the leading eos is
context only (its first token is predicted as a training document's is), the trailing a target.

Sliding window: a sequence longer than the window (the model's n_positions, or --seq_len) is scored
in windows that start every --stride tokens (default half the window); each window scores only the
targets no earlier window did, so every token is scored exactly once and, past the first window,
with at least window - stride tokens of context (the method of Hugging Face's perplexity guide).
Stride = window scores disjoint chunks, as the training loop's eval does; a smaller stride costs
window / stride times the compute for lower, truer loss.

The job:
  1. Driver: flags, model dir, tokenizer and corpus checked; bad input ends here, before Ray.
  2. Sequences: Ray Data tasks read and tokenize the text, or read_parquet the val rows.
  3. Scoring: map_batches over a pool of Scorer actors, each holding the model once (sent
     through the object store, so nodes need not see the driver's disk), a GPU each when the
     cluster has GPUs. A batch of sequences -> one row of sums. `--no_ray` runs the same
     functions in this process: the reference the Ray path is tested against.
  4. The driver adds the rows up; bits per byte = nats / ln 2 / UTF-8 bytes of the text.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpt2core import storage
from gpt2core.errors import UserError
from pipelines.common import dataset, placement, ray_session
from pipelines.common.entry import one_document, stage_main
from pipelines.common.flags import option, parse
from pipelines.common.modeldir import check_dtype
from pipelines.text import corpus

if TYPE_CHECKING:
    from gpt2core import GPT2Config, Tokenizer

CPUS_PER_ACTOR = 4  # a CPU actor's torch threads: more per actor gains little for small batches
IDS = np.dtype(np.int32)  # a sequence travels as raw int32 bytes (ragged, so not a tensor column)
SUMS = ("nats", "correct", "count", "bytes", "documents", "windows")


@dataclass
class EvaluateConfig:
    model_path: str | None = option(None, "the model dir to evaluate (HF GPT-2 format); "
                                    "required, except with --smoke-test")
    eval_corpus: list[str] = option(
        [], "text files, directories or globs (.txt, .jsonl, .parquet; local, s3://, gs://), "
        "or a dataset dir from `gpt2 prepare` (its val split); required, except with --smoke-test")
    vocab_path: str | None = option(
        None, "tokenizer for the text, which must be the model's vocabulary; without it, the "
        "tokenizer files in --model_path")
    batch_eval: int = option(8, "windows per forward pass (and sequences per Ray Data batch)")
    seq_len: int | None = option(None, "window length in tokens; without it (and at most) the "
                                 "model's n_positions")
    stride: int | None = option(
        None, "tokens a window moves along a long document; without it half the window; each "
        "token is scored once, with at least window - stride tokens of context")
    doc_per_line: bool = option(False, ".txt files: each line is a document, not each file")
    text_field: str = option("text", "the text field of .jsonl objects and column of .parquet")
    max_doc_bytes: int = option(
        64 << 10, "bytes; longer text documents are cut on line boundaries, as `gpt2 prepare` cuts "
        "them, so evaluating its input files counts the same tokens")
    actors: int | None = option(None, "model actors; without it one per GPU, else one per "
                                f"{CPUS_PER_ACTOR} CPUs")
    use_amp: bool = option(False, "bf16 autocast on CPUs (off: exact fp32); GPUs always "
                           "use bf16 autocast (fp16 before compute capability 8.0)")
    dtype: str | None = option(None, "weights to score with: float32, bfloat16, int8 (CPUs: "
                               "int8 weights, per-channel scales) or auto; without it float32 "
                               "weights (with --use_amp's autocast)")
    no_ray: bool = option(False, "score in this process, without Ray (small corpora)")
    json: bool = option(False, "print the results as one JSON object")
    mlflow_run_id: str | None = option(None, "log the results to this MLflow run")
    tracking_uri: str | None = option(None, "MLflow store; without it MLFLOW_TRACKING_URI, else "
                                      "sqlite:///mlflow.db")
    address: str | None = option(None, "Ray cluster to join; without it RAY_ADDRESS, else a new "
                                 "local one")
    smoke_test: bool = option(False, "evaluate a tiny model on a few lines, with and without "
                              "Ray, and compare", aliases=["--smoke-test"])

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        if not self.smoke_test and not self.model_path:
            raise UserError("--model_path is required: the model dir to evaluate.")
        if not self.smoke_test and not self.eval_corpus:
            raise UserError("--eval_corpus is required: text files or a dataset dir.")
        for name in ("batch_eval", "max_doc_bytes", "actors", "seq_len", "stride"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")


# --- scoring: a Ray Data actor over gpt2core.scoring ------------------------------------------

class Scorer:
    """A Ray Data actor (or a plain object with --no_ray): the model, once; sequences in, sums
    out. `weights` is the state dict, or [its ObjectRef] in the object store (in a list, so
    that Ray leaves fetching it to the actor rather than to actor creation)."""

    def __init__(self, config: dict, weights, window: int, stride: int, batch: int,
                 threads: int | None = None, use_amp: bool = False,
                 dtype: str | None = None):
        import torch

        from gpt2core import GPT2, GPT2Config
        from gpt2core.precision import autocast_dtype

        if isinstance(weights, list):  # [ObjectRef]: fetched once, by this actor
            import ray

            weights = ray.get(weights[0])
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = GPT2(GPT2Config(**config))
        self.model.load_state_dict(weights)
        self.model.to(self.device).eval()
        self.dtype = autocast_dtype("auto", self.device, use_amp)  # gpt2core/precision.py
        if dtype:  # the weights themselves in that dtype (gpt2core/quant.py), no autocast
            self.model.to_inference_dtype(dtype)
            self.dtype = None
        self.window, self.stride, self.batch = window, stride, batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from gpt2core.scoring import score

        sequences = [np.frombuffer(b, IDS) for b in batch["ids"]]
        sums = score(self.model, [s for s in sequences if len(s) >= 2], window=self.window,
                     stride=self.stride, batch=self.batch, device=self.device, dtype=self.dtype)
        counts = [c for c in map(json.loads, batch["invalid"]) if c]  # summarize adds them up
        errors = [str(e) for e in batch["error"] if e]
        return {**{k: np.array([v]) for k, v in sums.items()},
                "bytes": np.array([int(np.sum(batch["bytes"]))]),
                "documents": np.array([int(np.sum(batch["document"]))]),
                "error": np.array([errors[0] if errors else ""]),
                "invalid": np.array([json.dumps(counts)])}


# --- sequences: Ray Data UDFs ---------------------------------------------------------------

def text_sequences(batch: dict[str, np.ndarray], *, encoder: dict, text_field: str,
                   max_doc_bytes: int) -> dict[str, np.ndarray]:
    """One text work item -> a row per document: <eos> ids <eos> as int32 bytes, its UTF-8
    bytes. The item's read error and invalid-UTF-8 counts ride on its first row."""
    from pipelines.text.encoding import get_encoder

    texts, sizes, invalid, error = [], [], {}, ""
    try:
        for text, data, _, _ in corpus.item_documents(json.loads(batch["segments"][0]),
                                                       text_field, max_doc_bytes, invalid):
            texts.append(text)
            sizes.append(len(data))
    except corpus.CorpusError as e:
        error = str(e)
    eos = np.array([encoder["eos_id"]], IDS)
    ids = [np.concatenate([eos, doc.astype(IDS), eos]).tobytes()
           for doc in (get_encoder(encoder)(texts) if texts else [])]
    n = max(1, len(ids))  # an item with no document still reports its error and counts
    return _rows(ids or [b""], sizes or [0], [1] * len(ids) or [0],
                 [error] + [""] * (n - 1), [json.dumps(invalid)] + ["{}"] * (n - 1))


def row_sequences(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dataset rows -> their valid tokens (the first is context, the rest targets)."""
    rows = dataset.stack_rows(batch["tokens"])
    ids = [row[:n].astype(IDS).tobytes() for row, n in zip(rows, batch["length"])]
    k = len(ids)
    return _rows(ids, [0] * k, [0] * k, [""] * k, ["{}"] * k)


def _rows(ids, nbytes, documents, errors, invalid) -> dict[str, np.ndarray]:
    column = np.empty(len(ids), dtype=object)
    column[:] = ids  # bytes objects: a 1-D object array, never a 2-D one
    return {"ids": column, "bytes": np.array(nbytes, np.int64),
            "document": np.array(documents, np.int64), "error": np.array(errors, dtype=object),
            "invalid": np.array(invalid, dtype=object)}


# --- driver ---------------------------------------------------------------------------------

@dataclass
class EvalPlan:
    """What the driver worked out before scoring starts."""

    config: GPT2Config
    tokenizer: Tokenizer
    window: int
    stride: int
    weights: dict  # the state dict, read and checked on the driver
    sources: list  # corpus.Source, or [] for a dataset dir
    val: dataset.Split | None = None  # a dataset dir's val split
    val_files: list[str] = field(default_factory=list)  # its parquet shards (paths or URIs)


def plan(cfg: EvaluateConfig) -> EvalPlan:
    """Check everything that can be checked before Ray starts."""
    from gpt2core.model import state_shapes
    from gpt2core.modelfile import read_weights
    from gpt2core.tokenizer import TokenizerError
    from pipelines.common.modeldir import context_length, dir_tokenizer, open_model, same_vocabulary

    config, tokenizer = open_model(cfg.model_path, cfg.vocab_path)
    weights = read_weights(cfg.model_path, state_shapes(config))  # bad ones end here, not in Ray
    window = context_length(config, cfg.seq_len)
    stride = cfg.stride or max(1, window // 2)
    if stride > window:
        raise UserError(f"--stride {stride} is longer than the window ({window} tokens) and "
                        "would skip tokens; pass at most the window.")
    first = storage.resolve(cfg.eval_corpus[0])
    if len(cfg.eval_corpus) == 1 and storage.is_file(storage.join(first, dataset.MANIFEST)):
        val = dataset.load_manifest(first).splits["val"]
        data_tok = dir_tokenizer(first)
        if data_tok is None or not same_vocabulary(data_tok, tokenizer):
            raise TokenizerError(f"dataset {first} was prepared with another vocabulary than "
                                 "the model's; prepare it with --vocab_path set to the model dir.")
        if val.tokens == 0:
            raise corpus.CorpusError(f"the evaluation corpus is empty: dataset {first} has no "
                                     "val rows.")
        return EvalPlan(config, tokenizer, window, stride, weights, [], val,
                   [storage.join(first, s.file) for s in val.shards])
    sources = corpus.resolve(cfg.eval_corpus, role="val", per_line=cfg.doc_per_line,
                             text_field=cfg.text_field)
    if not any(s.size for s in sources):
        raise corpus.CorpusError("the evaluation corpus is empty: every --eval_corpus file is "
                                 "empty.")
    return EvalPlan(config, tokenizer, window, stride, weights, sources)


def evaluate(cfg: EvaluateConfig, job: EvalPlan | None = None) -> dict:
    """Score the corpus; returns the results (see `summarize`). Raises on bad input."""
    job = job or plan(cfg)
    start = time.perf_counter()
    ctor = dict(config=job.config.to_dict(), window=job.window, stride=job.stride,
                batch=cfg.batch_eval, use_amp=cfg.use_amp, dtype=cfg.dtype)
    if cfg.no_ray:
        scorer = Scorer(weights=job.weights, **ctor)
        parts = [{k: v[0] for k, v in scorer(batch).items()}  # rows, as take_all gives them
                 for batch in _local_sequences(cfg, job)]
        return summarize(parts, job, cfg, "in-process", time.perf_counter() - start)
    ray_session.init_ray(cfg.address)
    ray = ray_session.ray()
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    actors = cfg.actors or (gpus or max(1, cpus // CPUS_PER_ACTOR))
    # sized as training workers are: each actor fits a node, one CPU left to read the corpus
    share = placement.worker_share(placement.alive_nodes(), actors)
    actor_cpus, threads = (1, 1) if gpus else (share.cpus, share.threads)
    with ray_session.data_context(8 << 20):
        if job.val is not None:
            ds = ray.data.read_parquet([str(f) for f in job.val_files]) \
                .map_batches(row_sequences, batch_size=cfg.batch_eval)
        else:
            items, kwargs = _text_items(cfg, job, cpus)
            ds = ray.data.from_items([{"segments": s} for s in items],
                                     override_num_blocks=len(items))  # a task per item
            ds = ds.map_batches(text_sequences, batch_size=1, fn_kwargs=kwargs)
        parts = ds.map_batches(
            Scorer, batch_size=cfg.batch_eval, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_cpus, num_gpus=1 if gpus else 0,
            fn_constructor_kwargs=dict(weights=[ray.put(job.weights)], threads=threads,
                                       **ctor)).take_all()
    mode = f"Ray Data, {actors} actor(s)" + (" with a GPU each" if gpus else "")
    return summarize(parts, job, cfg, mode, time.perf_counter() - start)


def _text_items(cfg: EvaluateConfig, job: EvalPlan, cpus: int) -> tuple[list[str], dict]:
    """Work items (their segments as JSON) and text_sequences' keyword arguments."""
    from pipelines.text.encoding import encoder_spec

    target = corpus.item_bytes(sum(s.size for s in job.sources), cpus)  # sized as prepare's
    items = corpus.group(corpus.plan(job.sources, cfg.max_doc_bytes), target)
    spec = encoder_spec(job.tokenizer, pretokenized=False, probe=[], prefer_tiktoken=True)
    return [json.dumps(segs) for segs in items], dict(
        encoder=spec, text_field=cfg.text_field, max_doc_bytes=cfg.max_doc_bytes)


def _local_sequences(cfg: EvaluateConfig, job: EvalPlan) -> Iterator[dict[str, np.ndarray]]:
    """The same sequences as the Ray path, batch_eval at a time, read in this process."""
    if job.val is not None:
        batches = (row_sequences({"tokens": tokens, "length": lengths})
                   for tokens, lengths in map(dataset.read_shard, job.val_files))
    else:
        items, kwargs = _text_items(cfg, job, cpus=1)
        batches = (text_sequences({"segments": np.array([s])}, **kwargs) for s in items)
    for rows in batches:
        for i in range(0, len(rows["ids"]), cfg.batch_eval):
            yield {k: v[i:i + cfg.batch_eval] for k, v in rows.items()}


def summarize(parts: list[dict], job: EvalPlan, cfg: EvaluateConfig, mode: str,
              seconds: float) -> dict:
    """Per-batch sums -> loss, perplexity, bits per byte, accuracy, counts."""
    from gpt2core.training import bits_per_byte

    errors = [str(p["error"]) for p in parts if p["error"]]
    if errors:
        raise corpus.CorpusError(errors[0])
    corpus.check_utf8([c for p in parts for c in json.loads(p["invalid"])], max_fraction=0.01)
    total = {k: sum(float(p[k]) for p in parts) for k in SUMS}
    if job.val is not None:  # the dataset's counts: its rows do not carry them
        total["bytes"], total["documents"] = job.val.bytes, job.val.documents
    if total["count"] == 0:
        raise corpus.CorpusError("the evaluation corpus is empty: it holds no non-blank "
                                 "document.")
    loss = total["nats"] / total["count"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": bits_per_byte(loss, int(total["count"]), int(total["bytes"])),
            "accuracy": total["correct"] / total["count"], "tokens": int(total["count"]),
            "bytes": int(total["bytes"]), "documents": int(total["documents"]),
            "windows": int(total["windows"]), "window": job.window, "stride": job.stride,
            "scoring": scoring(job, int(total["windows"])),
            "model_path": str(cfg.model_path), "eval_corpus": list(cfg.eval_corpus),
            "mode": mode, "seconds": seconds}


def scoring(job: EvalPlan, windows: int) -> str:
    """How the tokens were scored, in words: dataset rows each alone, text in sliding windows."""
    if job.val is not None:
        whole = windows == job.val.rows
        return (f"as the dataset's {job.val.rows:,} val rows, each on its own"
                + (" and whole" if whole else f", in {windows:,} windows of {job.window} "
                   f"(stride {job.stride}) within longer rows"))
    return f"in {windows:,} windows of {job.window} (stride {job.stride}) along each document"


def report(r: dict) -> str:
    """The results as a small console table."""
    return "\n".join([
        f"model        {r['model_path']}",
        f"corpus       {', '.join(r['eval_corpus'])}: {r['documents']:,} documents, "
        f"{r['bytes']:,} bytes",
        f"tokens       {r['tokens']:,} scored {r['scoring']}",
        f"loss         {r['loss']:.4f} nats/token",
        f"perplexity   {r['perplexity']:.2f}",
        f"bits/byte    {r['bits_per_byte']:.4f}",
        f"accuracy     {100 * r['accuracy']:.2f} % (next token, argmax)",
        f"time         {r['seconds']:.1f} s ({r['tokens'] / max(r['seconds'], 1e-9):,.0f} "
        f"tokens/s; {r['mode']})"])


@stage_main("gpt2 evaluate")
def main(argv: list[str] | None = None) -> int:
    from pipelines.common.tracking import log_evaluation, open_run

    cfg = parse(EvaluateConfig, argv, prog="gpt2 evaluate", description=__doc__)
    if cfg.smoke_test:
        return _smoke_test(cfg)
    client = open_run(cfg.mlflow_run_id, cfg.tracking_uri) if cfg.mlflow_run_id else None
    with one_document() if cfg.json else contextlib.nullcontext(sys.stdout) as out:
        result = evaluate(cfg, plan(cfg))
        if client is not None:
            log_evaluation(client, cfg.mlflow_run_id, result)
        print(json.dumps(result) if cfg.json else report(result), file=out, flush=True)
    return 0


def _smoke_test(cfg: EvaluateConfig) -> int:
    """A random tiny model and a few lines, scored in-process and with Ray: the same numbers."""
    from gpt2core import GPT2, GPT2Config, Tokenizer

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60))
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train(text, vocab_size=300)
        GPT2(GPT2Config.from_preset("tiny", vocab_size=tok.vocab_size, n_positions=64)) \
            .save_pretrained(f"{tmp}/model", tok)
        Path(tmp, "val.txt").write_text(text, encoding="utf-8")
        small = replace(cfg, model_path=f"{tmp}/model", eval_corpus=[f"{tmp}/val.txt"],
                        smoke_test=False)
        local, ray = evaluate(replace(small, no_ray=True)), evaluate(replace(small, no_ray=False))
    assert local["tokens"] == ray["tokens"] > 64 and local["windows"] > 1
    assert math.isclose(local["loss"], ray["loss"], rel_tol=1e-5), (local, ray)
    print(report(ray) + "\nsmoke test passed")
    return 0


if __name__ == "__main__":
    from pipelines.evaluate import main  # this file as a module: Ray pickles its UDFs by reference

    sys.exit(main())
