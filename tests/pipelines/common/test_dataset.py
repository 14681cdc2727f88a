"""pipelines/common/dataset.py and packing.py: packing loses nothing, shards read back (whole or by
row group, in any order), manifests are checked, an --out is judged before it is touched."""

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.common import dataset
from pipelines.common.dataset import DatasetError
from pipelines.common.packing import DatasetWriter, RowPacker, ShardWriter

EOS = 7


def pack(pieces: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    packer = RowPacker(seq_len, EOS, np.dtype(np.uint16))
    rows = [packer.add(np.array(p, np.int64)) for p in pieces]
    lengths = [np.full(len(r), seq_len + 1) for r in rows]
    last = packer.finish()
    if last is not None:
        rows.append(last[0][None])
        lengths.append(np.array([last[1]]))
    return np.concatenate(rows), np.concatenate(lengths)


def unpack(rows: np.ndarray, lengths: np.ndarray) -> list[int]:
    """The stream without its leading eos: each row's tokens after the shared first one."""
    return [int(t) for row, n in zip(rows, lengths) for t in row[1:n]]


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.lists(st.integers(0, 60000), max_size=30), max_size=12),
       seq_len=st.integers(2, 9))
def test_packing_is_lossless_and_overlaps_by_one(pieces, seq_len):
    stream = [t for p in pieces for t in p]
    rows, lengths = pack(pieces, seq_len) if stream else (np.zeros((0, seq_len + 1)), [])
    assert unpack(rows, lengths) == stream  # every token a target exactly once, in order
    if len(rows):
        assert rows[0, 0] == EOS and (rows[1:, 0] == rows[:-1, -1]).all()
        assert (np.asarray(lengths)[:-1] == seq_len + 1).all() and lengths[-1] >= 2
        assert len(rows) == -(-len(stream) // seq_len)  # ceil(tokens / seq_len)
        assert (rows[-1, lengths[-1]:] == EOS).all()  # padding


def test_shards_split_at_shard_rows_and_read_back(tmp_path):
    import pyarrow.parquet as pq

    rows, lengths = pack([list(range(1, 100))], 4)
    writer = ShardWriter(tmp_path, "train", "k-", 4, np.dtype(np.uint16), shard_rows=10,
                         group_rows=5)
    writer.add(rows[:-1])
    writer.add(rows[-1:], lengths[-1:])
    shards = writer.close()
    assert [s.rows for s in shards] == [10, 10, 5] and sum(s.tokens for s in shards) == 99
    assert [s.file for s in shards] == [f"train/k-0000{i}.parquet" for i in range(3)]
    for s in shards:
        data = (tmp_path / s.file).read_bytes()
        assert (s.bytes, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        groups = pq.ParquetFile(tmp_path / s.file).metadata
        assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == \
            [5] * (s.rows // 5)
    back = [dataset.read_shard(tmp_path / s.file) for s in shards]
    assert np.array_equal(np.concatenate([t for t, _ in back]), rows)
    assert np.array_equal(np.concatenate([n for _, n in back]), lengths)
    assert dataset.stack_rows(np.array(list(rows), dtype=object)).shape == rows.shape
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == \
        [f"k-0000{i}.parquet" for i in range(3)]  # no temp file left


def test_row_groups_read_back_in_any_order(tmp_path):
    writer = DatasetWriter(tmp_path, seq_len=4, eos_id=EOS, dtype=np.dtype(np.uint16),
                           shard_mb=1, group_rows=3)
    for i in range(5):
        writer.add("train", np.arange(i * 10, i * 10 + 9) % 60000, 1, 9)
    writer.add("val", np.arange(7), 1, 7)
    splits = writer.close()
    assert splits["train"].rows == 12 and splits["train"].padding == 12 * 4 - 45
    manifest = dataset.Manifest({"file": "tokenizer.json", "sha256": "x"}, 300, EOS, 4,
                                "uint16", splits, group_rows=3)
    rows = np.concatenate([dataset.read_shard(tmp_path / s.file)[0]
                           for s in splits["train"].shards])
    units = dataset.row_groups(manifest, "train", tmp_path)
    assert [u["group"] for u in units] == [0, 1, 2, 3]
    table = dataset.read_groups({k: np.array([u[k] for u in units]) for k in ("file", "group")})
    assert np.array_equal(dataset.stack_rows(table.column("tokens").to_numpy(False)), rows)
    shuffled = dataset.row_groups(manifest, "train", tmp_path, seed=0)
    assert shuffled == dataset.row_groups(manifest, "train", tmp_path, seed=0) != units
    assert sorted(u["group"] for u in shuffled) == [0, 1, 2, 3]
    old = dataset.Manifest(**{**manifest.__dict__, "group_rows": 0})  # format 1: whole shards
    assert dataset.row_groups(old, "val", tmp_path) == \
        [{"file": str(tmp_path / "val/00000.parquet"), "group": -1}]


def test_dtype_follows_vocab_size():
    assert dataset.dtype_for(65536) == np.uint16 and dataset.dtype_for(65537) == np.int32


def write_dataset(root, fingerprint="f", config=None):
    split = dataset.Split(1, 1, 1, 1, [dataset.Shard("train/00000.parquet", 1, 1)])
    manifest = dataset.Manifest({"file": "tokenizer.json", "sha256": "x"}, 300, 0, 4, "uint16",
                                {"train": split, "val": dataset.Split(shards=[])},
                                config=config or {"seq_len": 4}, fingerprint=fingerprint)
    (root / "train").mkdir(parents=True)
    (root / "train" / "00000.parquet").write_bytes(b"")
    (root / "tokenizer.json").write_text("{}")
    (root / dataset.MANIFEST).write_text(manifest.to_json())
    return manifest


def test_load_manifest_round_trips_and_names_what_is_wrong(tmp_path):
    written = write_dataset(tmp_path / "ds")
    assert dataset.load_manifest(tmp_path / "ds") == written
    with pytest.raises(DatasetError, match="does not exist; make one with `gpt2 prepare"):
        dataset.load_manifest(tmp_path / "nope")
    (tmp_path / "ds" / "train" / "00000.parquet").unlink()
    with pytest.raises(DatasetError, match="incomplete .train/00000.parquet is missing"):
        dataset.load_manifest(tmp_path / "ds")
    raw = json.loads((tmp_path / "ds" / dataset.MANIFEST).read_text())
    (tmp_path / "ds" / dataset.MANIFEST).write_text(json.dumps({**raw, "format_version": 99}))
    with pytest.raises(DatasetError, match="format_version 99, this code reads 1 and 2"):
        dataset.load_manifest(tmp_path / "ds")
    (tmp_path / "ds" / dataset.MANIFEST).write_text(json.dumps({**raw, "format_version": 1}))
    (tmp_path / "ds" / "train" / "00000.parquet").write_bytes(b"")
    assert dataset.load_manifest(tmp_path / "ds").group_rows == 0  # format 1 still reads
    (tmp_path / "ds" / dataset.MANIFEST).write_text("{")
    with pytest.raises(DatasetError, match="damaged"):
        dataset.load_manifest(tmp_path / "ds")


def test_check_out_decides_what_an_existing_out_means(tmp_path):
    assert dataset.check_out(tmp_path / "new", "f", {}, overwrite=False) == "new"
    (tmp_path / "empty").mkdir()
    assert dataset.check_out(tmp_path / "empty", "f", {}, overwrite=False) == "new"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "mine.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="not a dataset dir"):
            dataset.check_out(tmp_path / "other", "f", {}, overwrite=overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file"):
        dataset.check_out(tmp_path / "file", "f", {}, overwrite=False)
    write_dataset(tmp_path / "ds", config={"seq_len": 4})
    assert dataset.check_out(tmp_path / "ds", "f", {"seq_len": 4}, overwrite=False) == "done"
    with pytest.raises(DatasetError, match=r"changed: seq_len\); pass --overwrite"):
        dataset.check_out(tmp_path / "ds", "g", {"seq_len": 8}, overwrite=False)
    assert dataset.check_out(tmp_path / "ds", "g", {"seq_len": 8}, overwrite=True) == "new"
    # an unfinished prepare: resumed with the same flags, replaced only with --overwrite
    (tmp_path / "part" / ".prepare").mkdir(parents=True)
    (tmp_path / "part" / dataset.STATE).write_text(
        json.dumps({"fingerprint": "f", "config": {"seq_len": 4}}))
    assert dataset.check_out(tmp_path / "part", "f", {"seq_len": 4}, overwrite=False) == \
        "resume"
    with pytest.raises(DatasetError, match=r"unfinished prepare .* \(changed: seq_len\); pass "
                                           "--overwrite"):
        dataset.check_out(tmp_path / "part", "g", {"seq_len": 8}, overwrite=False)
    assert dataset.check_out(tmp_path / "part", "f", {"seq_len": 4}, overwrite=True) == "new"
    dataset.clear(str(tmp_path / "part"))
    assert list((tmp_path / "part").iterdir()) == []
