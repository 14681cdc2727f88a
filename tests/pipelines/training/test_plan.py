"""pipelines/training/plan.py: what the driver works out before training."""

import pytest

from gpt2core import GPT2, GPT2Config
from pipelines.common import ray_session
from pipelines.common.dataset import Manifest, Split
from pipelines.common.placement import check_gpus, worker_share
from pipelines.training import plan as train_plan
from pipelines.training.config import TrainConfig
from pipelines.training.plan import make_plan, train_rows, validation_rows


def manifest(seq_len=64, vocab=512, train_rows=100, val_rows=4):
    split = lambda rows: Split(rows=rows, tokens=rows * seq_len, bytes=rows * seq_len * 3)  # noqa: E731
    return Manifest(tokenizer={}, vocab_size=vocab, eos_id=0, seq_len=seq_len, dtype="uint16",
                    splits={"train": split(train_rows), "val": split(val_rows)})


def test_from_scratch_follows_the_dataset_vocab_and_preset_shape():
    plan = make_plan(TrainConfig(preset="tiny", layers=2, dims=64, batch_train=16), manifest(),
                     world=1)
    c = plan.model_config
    assert (c.vocab_size, c.n_layer, c.n_embd, c.n_head, c.n_inner) == (512, 2, 64, 4, 256)
    assert plan.seq_len == 64 and plan.rows_per_batch == 16 and plan.steps_per_epoch == 6


def test_seq_len_defaults_to_the_longest_divisor_that_fits_the_model():
    plan = make_plan(TrainConfig(preset="tiny", batch_train=16), manifest(seq_len=1024), 1)
    assert plan.seq_len == 256  # tiny: n_positions 256; a 1024-token row makes 4 sequences
    assert plan.rows_per_batch == 4


def test_steps_per_epoch_counts_each_workers_equal_share():
    plan = make_plan(TrainConfig(batch_train=4, grad_accum=2), manifest(train_rows=101), 2)
    assert plan.steps_per_epoch == 50 // 4 // 2


@pytest.mark.parametrize("kwargs, world, m, message", [
    (dict(seq_len=48), 1, manifest(), "does not fit the dataset's rows of 64"),
    (dict(seq_len=512), 1, manifest(seq_len=256), "does not fit the dataset"),
    (dict(batch_train=3), 1, manifest(seq_len=512), "must be a multiple of 2"),
    (dict(batch_train=64), 2, manifest(train_rows=100), "batch is larger than the data"),
    (dict(), 8, manifest(val_rows=4, train_rows=1000), "fewer than the 8 workers"),
    (dict(preset="gpt3"), 1, manifest(), "unknown preset"),
    (dict(heads=3, dims=64), 1, manifest(), "n_embd|divisible|heads"),
])
def test_bad_combinations_are_named(kwargs, world, m, message):
    with pytest.raises(ValueError, match=message):
        make_plan(TrainConfig(**kwargs), m, world)


def test_seq_len_beyond_a_pretrained_models_context(tmp_path):
    GPT2(GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=1, n_head=2)) \
        .save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="longer than the model's context"):
        make_plan(TrainConfig(seq_len=64), manifest(), 1, str(tmp_path / "m"))
    with pytest.raises(ValueError, match="vocabulary of 512 tokens but the dataset's has 1000"):
        make_plan(TrainConfig(), manifest(vocab=1000), 1, str(tmp_path / "m"))
    assert make_plan(TrainConfig(), manifest(), 1, str(tmp_path / "m")).seq_len == 32


def test_flags_are_checked_when_parsed():
    for kwargs, message in [(dict(batch_train=0), "batch_train"), (dict(dropout=1.0), "dropout"),
                            (dict(base_lr=1e-4, min_lr=1e-3), "min_lr")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**kwargs)


def worker_cpus(cfg, nodes: list[dict], workers: int) -> tuple[float, int]:
    share = worker_share(nodes, workers, cpus_per_worker=cfg.cpus_per_worker)
    return share.cpus, share.threads


def test_workers_leave_a_cpu_for_ray_data_but_compute_on_their_share():
    cfg = TrainConfig()
    assert worker_cpus(cfg, [{"CPU": 2}], workers=1) == (1.0, 2)
    assert worker_cpus(cfg, [{"CPU": 2}], workers=2) == (0.5, 1)
    assert worker_cpus(cfg, [{"CPU": 8}, {"CPU": 8}], workers=2) == (7.0, 8)  # two 8-CPU nodes
    assert worker_cpus(TrainConfig(cpus_per_worker=0.25), [{"CPU": 2}], 1) == (0.25, 2)
    with pytest.raises(ValueError, match="too few"):
        worker_cpus(cfg, [{"CPU": 1}], workers=1)


def test_gpus_beyond_the_cluster_are_refused():
    check_gpus(1, 1, autoscaler=None)
    with pytest.raises(ValueError, match="--gpus 2 asks for more GPUs than the cluster has"):
        check_gpus(2, 1, autoscaler=None)


def test_the_original_projects_train_command_parses():
    from pipelines.common.flags import parse

    argv = ("--train_corpus a.txt --eval_corpus b.txt --vocab_path vocab.txt "
            "--save_checkpoint_path ckpts --save_model_path model --batch_train 32 "
            "--batch_eval 16 --seq_len 128 --total_steps 1000 --eval_steps 100 --save_steps 500 "
            "--layers 6 --heads 8 --dims 256 --rate 4 --dropout 0.1 --base_lr 1e-4 "
            "--wd_rate 0.01 --from_checkpoint c --from_pretrained p --use_amp --use_grad_ckpt "
            "--gpus 2").split()
    cfg = parse(TrainConfig, argv, prog="gpt2 train")
    assert cfg.corpus == ["a.txt"] and cfg.eval_corpus == ["b.txt"]
    assert cfg.storage_path == "ckpts" and cfg.save_model_path == "model"
    assert (cfg.layers, cfg.heads, cfg.dims, cfg.rate, cfg.seq_len) == (6, 8, 256, 4, 128)
    assert cfg.use_amp and cfg.use_grad_ckpt and cfg.gpus == 2 and cfg.base_lr == 1e-4
    assert cfg.min_lr is None  # not given: base_lr / 10, worked out at the schedule


def test_validation_rows_are_the_first_rows_of_val_that_evaluation_reads(train_data):

    import numpy as np

    from pipelines.common import dataset

    manifest = dataset.load_manifest(train_data)
    tokens, _ = dataset.read_split(train_data, "val")
    # --eval_batches 2 of 3 rows over all workers: the first 6 rows, in order, read once
    some = validation_rows(TrainConfig(eval_batches=2), manifest, train_data, 3)
    batch = some.take_batch(100, batch_format="numpy")
    assert np.array_equal(dataset.stack_rows(batch["tokens"]), tokens[:6])
    # --eval_batches 0 (the whole split): every row
    assert validation_rows(TrainConfig(eval_batches=0), manifest, train_data, 3).count() \
        == len(tokens) > 6


def test_a_small_train_split_is_cached_with_the_streams_rows_and_order(train_data, ray_local):

    import numpy as np
    from ray.data.dataset import MaterializedDataset

    from pipelines.common import dataset, ray_session

    manifest = dataset.load_manifest(train_data)
    cluster = ray_local.cluster_resources()
    cached = train_rows(TrainConfig(), manifest, train_data, cluster)
    streamed = train_rows(TrainConfig(cache_train_mb=0), manifest, train_data, cluster)
    assert isinstance(cached, MaterializedDataset)
    assert not isinstance(streamed, MaterializedDataset)
    with ray_session.ordered():  # as Ray Train reads them (DataConfig preserve_order)
        rows = [dataset.stack_rows(d.take_batch(10**6, batch_format="numpy")["tokens"])
                for d in (cached, streamed)]
    assert np.array_equal(rows[0], rows[1])
    # the row groups in the order --seed (0) shuffles them, each group's rows in order
    groups = dataset.row_groups(dataset.load_manifest(train_data), "train", train_data, seed=0)
    table = dataset.read_groups({k: np.array([g[k] for g in groups]) for k in ("file", "group")})
    assert np.array_equal(rows[0], dataset.stack_rows(table.column("tokens").to_numpy(False)))
    assert sorted(map(bytes, rows[0])) == \
        sorted(map(bytes, dataset.read_split(train_data, "train")[0]))
    # a split bigger than half the object store streams, whatever --cache_train_mb says
    tiny_store = {**cluster, "object_store_memory": 1000}
    assert not isinstance(train_rows(TrainConfig(), manifest, train_data, tiny_store),
                          MaterializedDataset)


@pytest.mark.slow
def test_two_sources_mix_from_the_first_batches_of_an_epoch(ray_local, tmp_path, monkeypatch):
    """--corpus a/ b/, two sources with distinct vocabularies, prepared in corpus order: the
    first 5 % of an epoch's batches draw rows from both (the row groups are read in an order
    the seed shuffles across the split; the shuffle buffer only mixes neighbouring blocks):
    read in shard order they would all come from a/. The order is the same for the same seed."""
    import random

    from gpt2core import Tokenizer
    from gpt2core.tokenizer import EOS_TOKEN
    from pipelines import prepare
    from pipelines.common import dataset
    from pipelines.preparing import passes as prepare_passes
    from pipelines.text import corpus
    from pipelines.training import data as train_data

    rng = random.Random(0)
    for source, letters in (("a", "abcdefghijklm"), ("b", "nopqrstuvwxyz")):
        (tmp_path / source).mkdir()
        for i in range(40):
            words = ("".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(700))
            (tmp_path / source / f"{i:02d}.txt").write_text(" ".join(words) + "\n")
    monkeypatch.setattr(corpus, "ITEM_BYTES", (8 << 10, 8 << 10))  # 40 work items
    monkeypatch.setattr(prepare_passes, "GROUP_BYTES", 32 * 17 * 2)  # row groups of 32 rows
    # a block per row group: Ray's shuffle buffer mixes whole blocks, and at real sizes a
    # block (8 MiB) is a sliver of the split; here one would hold all of it
    monkeypatch.setattr(train_plan, "READ_TASK_BYTES", 32 * 17 * 2)
    out = tmp_path / "ds"
    prepare.prepare(prepare.PrepareConfig(corpus=[str(tmp_path / "a"), str(tmp_path / "b")],
                                          out=str(out), vocab_size=300, seq_len=16))
    manifest = dataset.load_manifest(out)
    tok = Tokenizer.from_pretrained(out)

    def first_batches(seed: int | None) -> list[set[str]]:
        cfg = TrainConfig(seed=seed or 0, shuffle_buffer=64, batch_train=16, cache_train_mb=0)
        plan = make_plan(cfg, manifest, world=1)
        n = manifest.splits["train"].rows // plan.rows_per_batch
        seen = []
        with ray_session.ordered():  # as Ray Train reads (DataConfig preserve_order)
            rows = train_rows(cfg, manifest, out, {}) if seed is not None else \
                train_plan.ray_split(manifest, out, "train")
            for i, (inputs, _) in enumerate(train_data.batches(rows, plan, cfg, 0, 0, 0)):
                if i >= max(1, n // 20):
                    break
                texts = [tok.decode(row.tolist()).replace(EOS_TOKEN, "") for row in inputs]
                seen.append({"ab"[any(c in "nopqrstuvwxyz" for c in t)] for t in texts})
        return seen

    assert len(manifest.splits["train"].shards) > 20
    mixed = first_batches(seed=0)
    assert set().union(*mixed) == {"a", "b"} and len(mixed) >= 5
    assert first_batches(seed=0) == mixed  # fixed by the seed: what exact resume needs
    assert set().union(*first_batches(None)) == {"a"}  # shard order: one source first
