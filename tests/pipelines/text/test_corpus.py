"""pipelines/text/corpus.py (and listing.py, compressed.py): inputs resolve as documented, segments
read every line exactly once, big documents chunk the same way in a file and in memory,
compressed files give the same documents as plain ones and name the byte where they are
damaged, UTF-8 damage is counted. No Ray."""

import bz2
import glob
import gzip
import json
import lzma
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.text import compressed, corpus
from pipelines.text.corpus import CorpusError

LINES = st.lists(st.text(alphabet="ab é\r\t你🙂", max_size=30), max_size=40)


def resolve(*paths, per_line=False, field="text"):
    return corpus.resolve(list(map(str, paths)), role="auto", per_line=per_line, text_field=field)


def documents(sources, max_doc_bytes=1 << 20, field="text"):
    invalid = {}
    docs = [d for seg in corpus.plan(sources, max_doc_bytes)
            for d in corpus.read_documents(seg, field, max_doc_bytes, invalid)]
    return docs, invalid


def reference_chunks(text: str, max_bytes: int) -> list[str]:
    """The documented rule, written plainly: chunk k = lines starting in [k*M, (k+1)*M)."""
    data = text.encode()
    if len(data) <= max_bytes:
        return [text]
    starts = [0] + [i + 1 for i, b in enumerate(data[:-1]) if b == 10]
    groups: dict[int, list[int]] = {}
    for s in starts:
        groups.setdefault(s // max_bytes, []).append(s)
    firsts = sorted(g[0] for g in groups.values()) + [len(data)]
    return [data[a:b].decode() for a, b in zip(firsts, firsts[1:])]


# --- resolve ------------------------------------------------------------------------------

def test_files_dirs_and_globs_resolve_in_order(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("d/b.txt", "d/a.jsonl", "d/sub/c.txt", "d/.hidden/x.txt", "d/notes.md"):
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith("jsonl") else "x")
    got = [(s.uri, s.fmt) for s in resolve(tmp_path / "d")]
    assert got == [(str(tmp_path / "d/a.jsonl"), "jsonl"), (str(tmp_path / "d/b.txt"), "text"),
                   (str(tmp_path / "d/sub/c.txt"), "text")]  # hidden and .md skipped in dirs
    assert [s.uri for s in resolve(tmp_path / "d" / "**" / "*.txt")] == \
        [str(tmp_path / "d/b.txt"), str(tmp_path / "d/sub/c.txt")]
    named = resolve(tmp_path / "d" / "notes.md", per_line=True)
    assert [s.fmt for s in named] == ["lines"]  # a file named explicitly is text


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("*.nothing", None, "matches no files"),
    ("empty", "dir", "holds no .txt"),
    ("x.zip", "PK", "convert or decompress it"),
    ("x.parquet.gz", "\x1f", "convert or decompress it"),
    ("x.json", "[]", "JSON Lines"),
    ("x.jsonl", '{"body": "a"}\n', "x.jsonl line 1 has no string field 'text'"),
    ("x.jsonl", '\n{"text": \n{}', "x.jsonl line 2 is not valid JSON"),
])
def test_bad_inputs_are_one_sentence(tmp_path, name, content, message):
    if content == "dir":
        (tmp_path / name).mkdir()
    elif content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CorpusError, match=message) as e:
        resolve(tmp_path / name)
    assert ". " not in str(e.value) and str(e.value).endswith(".")


def test_parquet_column_is_checked(tmp_path):
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match="no column 'text'.*--text_field"):
        resolve(tmp_path / "x.parquet")
    with pytest.raises(CorpusError, match="not text"):
        resolve(tmp_path / "x.parquet", field="n")
    assert resolve(tmp_path / "x.parquet", field="body")[0].fmt == "parquet"


# --- documents ----------------------------------------------------------------------------

def test_each_format_gives_its_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one file\nis one document\n")
    (tmp_path / "b.txt").write_text("line one\r\n\n   \nline two")
    (tmp_path / "c.jsonl").write_text('{"text": "first"}\n\n{"text": "sec\\nond", "x": 1}\n')
    pq.write_table(pa.table({"text": ["row a", None, "  ", "row b"]}), tmp_path / "d.parquet",
                   row_group_size=2)
    assert documents(resolve(tmp_path / "a.txt"))[0] == ["one file\nis one document\n"]
    assert documents(resolve(tmp_path / "b.txt", per_line=True))[0] == ["line one", "line two"]
    assert documents(resolve(tmp_path / "c.jsonl"))[0] == ["first", "sec\nond"]
    assert documents(resolve(tmp_path / "d.parquet"))[0] == ["row a", "row b"]


def test_a_bad_json_line_names_file_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl line 2 has no string field 'text'"):
        documents(resolve(tmp_path / "c.jsonl"))


@settings(max_examples=60, deadline=None)
@given(lines=LINES, step=st.integers(1, 40))
def test_segments_read_every_line_exactly_once(tmp_path_factory, lines, step):
    path = tmp_path_factory.mktemp("seg") / "f.txt"
    data = "\n".join(lines).encode()
    path.write_bytes(data)
    pieces = [corpus.read_lines(str(path), s, min(s + step, len(data)), len(data))
              for s in range(0, len(data), step)]
    assert b"".join(pieces) == data
    ends = [len(b"".join(pieces[:i + 1])) for i in range(len(pieces))]
    assert all(p == b"" or p.endswith(b"\n") or end == len(data) for p, end in zip(pieces, ends))


@settings(max_examples=60, deadline=None)
@given(lines=LINES, max_bytes=st.integers(4, 64))
def test_chunks_follow_the_rule_in_memory_and_in_files(tmp_path_factory, lines, max_bytes):
    text = "\n".join(lines)
    assert corpus.chunk_document(text, max_bytes) == reference_chunks(text, max_bytes)
    path = tmp_path_factory.mktemp("chunk") / "f.txt"
    path.write_bytes(text.encode())
    expected = [c for c in reference_chunks(text, max_bytes) if c.strip()]
    assert documents(resolve(path), max_bytes)[0] == expected


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    raw = b"caf\xe9 ok\n\xff\xfe end \xe2\x82"  # latin-1 e-acute, two stray bytes, a cut euro
    text, bad = corpus.decode_utf8(raw)
    assert text == raw.decode("utf-8", "replace") and bad == 5
    (tmp_path / "x.txt").write_bytes(raw)
    docs, invalid = documents(resolve(tmp_path / "x.txt"))
    assert docs == [text] and invalid == {str(tmp_path / "x.txt"): [5, len(raw)]}
    assert corpus.clean(json.loads('"a\\ud800b"'))[0] == "a\ufffdb"  # a lone JSON surrogate


def test_split_is_a_pure_function_of_the_document():
    cut = corpus.threshold(0.5)
    hashes = [corpus.doc_hash(f"document {i}".encode()) for i in range(400)]
    assert hashes == [corpus.doc_hash(f"document {i}".encode()) for i in range(400)]
    share = sum(corpus.is_val("auto", h, cut) for h in hashes) / len(hashes)
    assert 0.4 < share < 0.6
    assert corpus.is_val("val", 2**64 - 1, 0) and not corpus.is_val("train", 0, 2**64)


def test_plan_and_group_keep_corpus_order(tmp_path):
    (tmp_path / "big.txt").write_text("x\n" * 100)
    (tmp_path / "small.txt").write_text("y")
    segments = list(corpus.plan(resolve(tmp_path / "big.txt", tmp_path / "small.txt"), 64))
    assert [(s["start"], s["end"]) for s in segments] == [(0, 64), (64, 128), (128, 192),
                                                         (192, 200), (0, 1)]
    items = corpus.group(segments, 100)
    assert [len(i) for i in items] == [2, 3] and sum(items, []) == segments


def test_uris_read_through_pyarrow_filesystems(tmp_path):
    """s3:// and gs:// take the pyarrow path that file:// takes here."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x\n" * 50)
    (tmp_path / "d" / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "d" / "skip.md").write_text("not read")
    local = resolve(tmp_path / "d")
    remote = corpus.resolve([f"file://{tmp_path}/d"], role="auto", per_line=False,
                            text_field="text")
    assert [s.uri for s in remote] == [f"file://{s.uri}" for s in local]
    assert documents(remote, 16)[0] == documents(local, 16)[0]
    globbed = corpus.resolve([f"file://{tmp_path}/d/*.md"], role="auto", per_line=False,
                             text_field="text")
    assert [s.fmt for s in globbed] == ["text"]
    with pytest.raises(CorpusError, match="does not exist or holds no"):
        corpus.resolve([f"file://{tmp_path}/nope"], role="auto", per_line=False,
                       text_field="text")


# --- compressed inputs ----------------------------------------------------------------------

def compress(codec: str, data: bytes) -> bytes:
    """`data` in two streams (members, frames) one after the other, as `cat a.gz b.gz` makes."""
    if codec == ".zst":
        import pyarrow as pa

        one = lambda d: pa.Codec("zstd").compress(d, asbytes=True)  # noqa: E731
    else:
        one = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[codec]
    half = len(data) // 2
    return one(data[:half]) + one(data[half:])


@pytest.mark.parametrize("codec", compressed.CODECS)
def test_compressed_files_give_the_documents_of_plain_ones(tmp_path, monkeypatch, codec):
    monkeypatch.setattr(corpus, "PIECE_BYTES", 50)  # many pieces: lines cross their edges
    text = "".join(f"line {i}: naïve café 你好 🙂 {'x' * (i % 23)}\n" for i in range(120))
    jsonl = "".join(json.dumps({"text": f"doc {i} " * (i % 7 + 1)}) + "\n" for i in range(80))
    for name, content in (("a.txt", text), ("b.jsonl", jsonl)):
        (tmp_path / name).write_text(content)
        (tmp_path / (name + codec)).write_bytes(compress(codec, content.encode()))
    for name, per_line in (("a.txt", False), ("a.txt", True), ("b.jsonl", False)):
        plain = resolve(tmp_path / name, per_line=per_line)
        packed = resolve(tmp_path / (name + codec), per_line=per_line)
        assert packed[0].codec == codec and packed[0].fmt == plain[0].fmt
        assert len(list(corpus.plan(packed, 256))) == 1  # read from its start, by one task
        docs, invalid = documents(packed, 256)
        assert docs == documents(plain, 256)[0] and len(docs) > 10
        assert invalid[str(tmp_path / (name + codec))][1] == (tmp_path / name).stat().st_size
    found = [s.uri for s in resolve(tmp_path)]  # a directory takes them in, beside the plain
    assert str(tmp_path / ("a.txt" + codec)) in found and str(tmp_path / "b.jsonl") in found


@pytest.mark.parametrize("codec", compressed.CODECS)
def test_damaged_compressed_files_name_the_file_and_the_byte(tmp_path, codec):
    data = "".join(f"{i} some text to compress {i * 7919 % 1000}\n" for i in range(20000))
    packed = compress(codec, data.encode())
    damaged = bytearray(packed)
    middle = len(packed) // 4
    damaged[middle:middle + 64] = bytes(64)
    (tmp_path / ("damaged.txt" + codec)).write_bytes(bytes(damaged))
    (tmp_path / ("short.txt" + codec)).write_bytes(packed[:len(packed) // 4])
    for name, message in (("damaged", rf"is not valid {codec[1:]} data: decoding failed "
                                      r"between bytes [\d,]+ and [\d,]+ \("),
                          ("short", rf"is cut short: its {codec[1:]} data ends at byte "
                                    f"{len(packed) // 4:,} before")):
        path = tmp_path / (name + ".txt" + codec)
        with pytest.raises(CorpusError, match=message) as e:
            documents(resolve(path, per_line=True))
        assert str(path) in str(e.value) and str(e.value).endswith("again.")
        if name == "damaged":  # found at or after the damage (gzip: at its member's CRC)
            low, high = (int(x.replace(",", "")) for x in
                         str(e.value).split("between bytes ")[1].split(" (")[0].split(" and "))
            assert low < high and high >= middle and low < len(packed)


@settings(max_examples=60, deadline=None)
@given(lines=LINES, max_bytes=st.integers(4, 64), cuts=st.lists(st.integers(0, 400)))
def test_pieces_of_a_stream_follow_the_chunk_rule(lines, max_bytes, cuts):
    data = "\n".join(lines).encode()
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]  # however the stream arrives
    pieces = list(compressed.line_pieces(iter(chunks), max_bytes))
    assert b"".join(pieces) == data
    assert [p.decode() for p in pieces] == [c for c in reference_chunks(data.decode(), max_bytes)
                                            if c]


def test_parquet_segments_hold_the_row_groups_that_start_in_them(tmp_path, monkeypatch):
    rows = [f"row {i} " + "y" * (i % 50) for i in range(500)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "p.parquet", row_group_size=17)
    monkeypatch.setattr(corpus, "SEGMENT_BYTES", 700)
    segments = list(corpus.plan(resolve(tmp_path / "p.parquet"), 1 << 20))
    assert len(segments) > 5
    assert [d for seg in segments for d in corpus.read_documents(seg, "text", 1 << 20, {})] \
        == rows


def test_globs_stream_in_full_path_order(tmp_path):
    for name in ("a.txt", "a/b.txt", "a/c/d.txt", "b.txt", ".hidden/e.txt", "a/.f.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    for pattern in ("*.txt", "**/*.txt", "a/**", "*/*.txt", "a/[bc]*", "?.txt"):
        want = sorted(p for p in glob.glob(str(tmp_path / pattern), recursive=True)
                      if os.path.isfile(p))
        got = [s.uri for s in resolve(tmp_path / pattern)]
        assert got == want, pattern
        remote = corpus.resolve([f"file://{tmp_path}/{pattern}"], role="auto", per_line=False,
                                text_field="text")
        assert [s.uri for s in remote] == [f"file://{p}" for p in want], pattern
