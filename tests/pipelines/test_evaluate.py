"""pipelines/evaluate.py: the numbers equal a direct computation, the sliding window scores each
token once, Ray Data equals the in-process path, and bad input ends in one sentence, exit 2."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2core import GPT2, GPT2Config, Tokenizer
from gpt2core.training import evaluate as train_evaluate
from gpt2core.training import rows_to_batch
from pipelines import evaluate as ev
from pipelines.common import dataset, packing

DOCS = ["ROMEO: What light through yonder window breaks?",
        "JULIET: O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy "
        "name; or, if thou wilt not, be but sworn my love, and I'll no longer be a Capulet.",
        "naïve café 你好 🙂 and a little more plain text for the merges"]


def tiny_model(tok: Tokenizer, n_positions: int) -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=n_positions, n_embd=16,
                           n_layer=2, n_head=2)).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(DOCS * 3, vocab_size=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """A model with a short context (32: the long document needs windows), a wide one, the
    corpus as .jsonl, and a dataset dir of the same documents as its val split."""
    root = tmp_path_factory.mktemp("evaluate")
    tiny_model(tok, 32).save_pretrained(root / "short", tok)
    tiny_model(tok, 256).save_pretrained(root / "wide", tok)
    (root / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = root / "data"
    tok.save(out)
    dtype = dataset.dtype_for(tok.vocab_size)
    writer = packing.DatasetWriter(out, seq_len=64, eos_id=tok.eos_id, dtype=dtype, shard_mb=1)
    for split in dataset.SPLITS:
        for d in DOCS:
            writer.add(split, np.array(tok.encode(d) + [tok.eos_id]), 1, len(d.encode()))
    manifest = dataset.Manifest(tokenizer={"file": "tokenizer.json", "sha256": tok.sha256()},
                                vocab_size=tok.vocab_size, eos_id=tok.eos_id, seq_len=64,
                                dtype=dtype.name, splits=writer.close())
    (out / dataset.MANIFEST).write_text(manifest.to_json())
    return root


def run_eval(root, *args, model="short") -> dict:
    cfg = ev.EvaluateConfig(model_path=str(root / model), **dict(args))
    return ev.evaluate(cfg)


def test_in_process_equals_direct_mean_nll(files, tok):
    """Every document fits the context: the mean NLL of <eos> doc <eos>, computed directly."""
    r = run_eval(files, ("eval_corpus", [str(files / "val.jsonl")]), ("no_ray", True),
                 model="wide")
    model = GPT2.from_pretrained(files / "wide").eval()
    nats, right, count = 0.0, 0, 0
    for d in DOCS:
        ids = torch.tensor([tok.eos_id] + tok.encode(d) + [tok.eos_id])
        logits = model(ids[None, :-1])[0]
        nats += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        right += int((logits.argmax(-1) == ids[1:]).sum())
        count += len(ids) - 1
    assert r["tokens"] == count and r["documents"] == 3 and r["windows"] == 3
    assert r["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert r["accuracy"] == pytest.approx(right / count)
    assert r["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert r["bits_per_byte"] == pytest.approx(nats / r["bytes"] / math.log(2), rel=1e-5)


def test_sliding_window_equals_the_hf_guide_loop(files, tok):
    """A document longer than the context, scored as Hugging Face's perplexity guide does."""
    long_doc = DOCS[1]
    (files / "long.txt").write_text(long_doc)
    model = GPT2.from_pretrained(files / "short").eval()
    ids = torch.tensor([tok.eos_id] + tok.encode(long_doc) + [tok.eos_id])
    assert len(ids) > 2 * 32
    for stride in (32, 12):
        nats, count, prev_end = 0.0, 0, 0
        for begin in range(0, len(ids), stride):  # the guide's loop; its labels shift by one
            end = min(begin + 32 + 1, len(ids))
            chunk = ids[begin:end]
            labels = chunk.clone()
            labels[:-(end - prev_end) or None] = -100  # only targets past the last window's
            labels[0] = -100
            logits = model(chunk[None, :-1])[0]
            nats += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum")
            count += int((labels[1:] != -100).sum())
            prev_end = end
            if end == len(ids):
                break
        r = run_eval(files, ("eval_corpus", [str(files / "long.txt")]), ("no_ray", True),
                     ("stride", stride))
        assert count == len(ids) - 1 == r["tokens"]
        assert r["loss"] == pytest.approx(nats.item() / count, rel=1e-5), stride


def test_dataset_dir_counts_its_val_split_and_stride_window_is_the_training_eval(files):
    manifest = dataset.load_manifest(files / "data")
    r = run_eval(files, ("eval_corpus", [str(files / "data")]), ("no_ray", True),
                 ("stride", 32))
    val = manifest.splits["val"]
    assert (r["tokens"], r["bytes"], r["documents"]) == (val.tokens, val.bytes, val.documents)
    rows, lengths = dataset.read_split(files / "data", "val")
    model = GPT2.from_pretrained(files / "short")
    nats, count = train_evaluate(model, [rows_to_batch(torch.from_numpy(rows.astype(np.int64)),
                                                       torch.from_numpy(lengths), 32)], "cpu")
    assert count == r["tokens"]
    assert r["loss"] == pytest.approx(nats / count, rel=1e-5)


@pytest.mark.slow
def test_dtype_int8_scores_with_int8_weights_close_to_float32(files):
    args = (("eval_corpus", [str(files / "val.jsonl")]), ("no_ray", True))
    full, int8 = run_eval(files, *args, model="wide"), \
        run_eval(files, *args, ("dtype", "int8"), model="wide")
    assert int8["tokens"] == full["tokens"] and int8["loss"] != full["loss"]
    assert int8["loss"] == pytest.approx(full["loss"], rel=0.01)
    with pytest.raises(ValueError, match="--dtype is one of"):
        ev.EvaluateConfig(model_path="m", eval_corpus=["x"], dtype="fp8")
    from gpt2core.quant import DTYPES
    from pipelines.common.modeldir import DTYPES as FLAG_DTYPES

    assert FLAG_DTYPES == DTYPES  # the flags' copy (no torch import to parse flags)


def test_ray_data_path_equals_in_process_path(ray_local, files):
    for corpus in ("val.jsonl", "data"):
        args = (("eval_corpus", [str(files / corpus)]), ("batch_eval", 2))
        local = run_eval(files, *args, ("no_ray", True))
        remote = run_eval(files, *args, ("actors", 1))
        assert remote["mode"].startswith("Ray Data")
        for key in ("tokens", "bytes", "documents", "windows", "accuracy"):
            assert remote[key] == local[key], (corpus, key)
        for key in ("loss", "bits_per_byte", "perplexity"):
            assert remote[key] == pytest.approx(local[key], rel=1e-5), (corpus, key)


def test_json_output_and_mlflow_logging(files, tmp_path, capsys, refused):
    from mlflow import MlflowClient

    from pipelines.common.tracking import RunLog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = RunLog(uri, "evaluate-test", "run", {"a": 1})
    log.log(7, {"train/loss": 5.0})
    code = ev.main(["--model_path", str(files / "short"), "--eval_corpus",
                    str(files / "val.jsonl"), "--no_ray", "--json", "--mlflow_run_id",
                    log.run_id, "--tracking_uri", uri])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "perplexity", "bits_per_byte", "accuracy", "tokens"} <= set(result)
    history = MlflowClient(uri).get_metric_history(log.run_id, "evaluate/loss")
    assert [(m.step, m.value) for m in history] == [(7, pytest.approx(result["loss"]))]
    assert "run 0123456789abcdef does not exist" in refused(
        ev.main, "--model_path", files / "short", "--eval_corpus", files / "val.jsonl",
        "--mlflow_run_id", "0123456789abcdef", "--tracking_uri", uri)


def test_report_names_every_number(files, capsys):
    assert ev.main(["--model_path", str(files / "short"), "--eval_corpus",
                    str(files / "val.jsonl"), "--no_ray"]) == 0
    out = capsys.readouterr().out
    for word in ("loss", "perplexity", "bits/byte", "accuracy", "tokens", "stride 16"):
        assert word in out


def test_bad_inputs_end_in_one_sentence(files, tmp_path, refused):
    model, val = files / "short", files / "val.jsonl"
    assert "does not exist" in refused(ev.main, "--model_path", tmp_path / "nope", "--eval_corpus",
                                       val, "--no_ray")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    assert "corrupt" in refused(ev.main, "--model_path", corrupt, "--eval_corpus", val, "--no_ray")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model / "config.json").read_text())
    assert "model.safetensors" in refused(ev.main, "--model_path", no_weights, "--vocab_path",
                                          model, "--eval_corpus", val)
    other = Tokenizer.train(["something else entirely " * 20], vocab_size=290)
    other.save(tmp_path / "other_vocab")
    assert "is not the vocabulary of the model" in refused(
        ev.main, "--model_path", model, "--vocab_path", tmp_path / "other_vocab",
        "--eval_corpus", val)
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in refused(ev.main, "--model_path", model, "--eval_corpus",
                              tmp_path / "empty.txt")
    (tmp_path / "blank.txt").write_text("\n   \n")
    assert "empty" in refused(ev.main, "--model_path", model, "--eval_corpus",
                              tmp_path / "blank.txt", "--no_ray")
    assert "exceeds the model's context" in refused(ev.main, "--model_path", model, "--eval_corpus",
                                                    val, "--seq_len", 64)
    assert "--eval_corpus is required" in refused(ev.main, "--model_path", model)
    assert "no MLflow store" in refused(ev.main, "--model_path", model, "--eval_corpus", val,
                                        "--mlflow_run_id", "0123456789abcdef", "--tracking_uri",
                                        f"sqlite:///{tmp_path / 'no-store.db'}")


def test_a_dataset_of_another_vocabulary_is_refused(files, tmp_path, refused):
    data = tmp_path / "data"
    shutil.copytree(files / "data", data)
    Tokenizer.train(["something else entirely " * 20], vocab_size=290).save(data)
    assert "another vocabulary" in refused(ev.main, "--model_path", files / "short",
                                           "--eval_corpus", data)


def test_summary_states_the_scoring_used(files):
    """A dataset's rows are scored each on its own, not in windows along a document."""
    val = dataset.load_manifest(files / "data").splits["val"]
    r = run_eval(files, ("eval_corpus", [str(files / "data")]), ("no_ray", True))
    assert r["scoring"].startswith(f"as the dataset's {val.rows:,} val rows, each on its own")
    assert r["scoring"] in ev.report(r)
    r = run_eval(files, ("eval_corpus", [str(files / "val.jsonl")]), ("no_ray", True))
    assert r["scoring"] == (f"in {r['windows']:,} windows of {r['window']} (stride "
                            f"{r['stride']}) along each document")
