"""The driver of the prepare job (pipelines/prepare.py tells it top to bottom): list, plan,
train or load the tokenizer, tokenize with Ray Data, write the manifest last."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

from gpt2core import storage
from pipelines.common import dataset, ray_session
from pipelines.preparing.config import NOT_FINGERPRINTED, PrepareConfig
from pipelines.preparing.passes import Passes, listing, tidy
from pipelines.text import corpus
from pipelines.text.encoding import encoder_spec


def prepare(cfg: PrepareConfig) -> dict:
    """Run the job; returns timings and counts. Raises CorpusError/TokenizerError on bad input."""
    from gpt2core.tokenizer import Tokenizer, TokenizerError

    start = time.perf_counter()
    out = _out_path(cfg.out)
    inputs = listing(cfg)
    tokenizer = Tokenizer.from_pretrained(cfg.vocab_path) if cfg.vocab_path else None
    if cfg.pretokenized:
        encoder_spec(tokenizer, pretokenized=True, probe=[])  # checks for <unk>, before Ray
    fingerprint, config = _fingerprint(cfg, inputs.digest, tokenizer)
    state = dataset.check_out(out, fingerprint, config, cfg.overwrite)
    if state == "done":
        print(f"{out} is up to date (same inputs and flags); --overwrite to prepare it again.")
        return {"up_to_date": True, "out": str(out)}

    ray_s = ray_session.init_ray(cfg.address)
    fresh = not storage.exists(out)
    try:
        ray_session.check_shared(out, "--out")
    except ValueError as e:
        raise dataset.DatasetError(str(e)) from None
    if state == "new":
        dataset.clear(out)
    t0 = time.perf_counter()
    cpus = max(1, int(ray_session.ray().cluster_resources().get("CPU", 1)))
    target = corpus.item_bytes(inputs.bytes, cpus)
    if state == "resume":  # the interrupted run's work items, whatever the cluster is now
        saved = json.loads(storage.read_text(storage.join(out, dataset.STATE)))
        target = saved.get("item_bytes", target)
    print(f"{inputs.files} files, {inputs.bytes / 1e6:.2f} MB, in work items of "
          f"{target / 2**20:.2f} MiB on {cpus} CPUs (Ray start-up {ray_s:.1f} s)"
          + ("; resuming an interrupted run" if state == "resume" else ""))
    passes = Passes(cfg, out, target, inputs, fingerprint, NOT_FINGERPRINTED)
    try:
        tokenizer, sample_s = passes.tokenizer(tokenizer, config, resume=state == "resume")
        t2 = time.perf_counter()
        records, invalid = passes.tokenize(None)
        manifest = passes.manifest(records, invalid)
        storage.write_text(storage.join(out, dataset.MANIFEST), manifest.to_json())
    except (corpus.CorpusError, TokenizerError):
        storage.delete(out) if fresh else dataset.clear(out)  # bad input: nothing to resume
        raise
    tidy(out, manifest)
    end = time.perf_counter()
    reused = sum(r.reused for r in records.values())
    times = {"ray_start_s": ray_s, "sample_s": sample_s, "tokenizer_s": t2 - t0 - sample_s,
             "tokenize_s": end - t2, "prepare_s": end - t0, "total_s": end - start}
    mb = inputs.bytes / 1e6
    print(f"{manifest.table()}\nprepared {mb:.2f} MB in {times['prepare_s']:.1f} s "
          f"({mb / times['prepare_s']:.2f} MB/s; sample {sample_s:.1f} s, tokenizer "
          f"{times['tokenizer_s']:.1f} s, tokenize {times['tokenize_s']:.1f} s; {len(records)} "
          f"work items, {reused} reused; Ray start-up {ray_s:.1f} s not counted) -> {out}")
    return {"up_to_date": False, "out": str(out), "bytes": inputs.bytes, **times,
            "encoder": manifest.source["encoder"], "items": len(records), "reused": reused,
            "task_s": sum(r.seconds for r in records.values() if not r.reused),
            "redone": passes.redone,
            "padding": {k: s.padding for k, s in manifest.splits.items()}}


def _out_path(out: str) -> str:
    """--out resolved: a URI's bucket must answer now, before Ray starts."""
    storage.check_bucket(out, "--out")
    return storage.resolve(out)


def _fingerprint(cfg: PrepareConfig, digest: str, tokenizer) -> tuple[str, dict]:
    config = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    blob = json.dumps([dataset.FORMAT_VERSION, config, digest,
                       tokenizer.sha256() if tokenizer else None])
    return hashlib.sha256(blob.encode()).hexdigest(), config
