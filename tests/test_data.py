"""remat._data: the default stdlib corpus, user corpora and their errors, the split,
the memory-mapped cache and position-addressed batches."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from remat._data import (
    EXCLUDED_DIRS,
    Batches,
    CorpusError,
    build_corpus,
    collect_files,
    eval_batches,
    split_files,
    stdlib_files,
)


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ---- default corpus: the running CPython's standard library ----

def test_stdlib_files_found_on_this_python():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = {p.relative_to(root).as_posix() for p in files}
    # modules every CPython ships as source
    assert {"os.py", "json/__init__.py", "collections/__init__.py", "argparse.py"} <= rel
    assert len(files) > 300
    assert all(p.suffix == ".py" for p in files)
    assert not any(set(p.relative_to(root).parts[:-1]) & EXCLUDED_DIRS for p in files)
    assert files == sorted(files)


def test_default_split_is_by_file_deterministic_and_disjoint(tmp_path):
    corpus = build_corpus(None, tmp_path / "c")
    assert set(corpus.train_files).isdisjoint(corpus.val_files)
    assert 0.05 < len(corpus.val_files) / (len(corpus.train_files) + len(corpus.val_files)) < 0.15
    again = split_files(collect_files(None), 0.1)
    assert [str(p) for p in again[1]] == list(corpus.val_files)
    assert isinstance(corpus.train, np.memmap) and corpus.train.dtype == np.uint8
    first = Path(corpus.train_files[0]).read_bytes()
    assert bytes(corpus.train[:len(first)]) == first
    assert corpus.train.size == sum(Path(f).stat().st_size for f in corpus.train_files)


# ---- user corpora ----

def test_folder_corpus_concatenates_in_order_and_is_cached(tmp_path):
    src = _write(tmp_path / "src", {f"d{i % 3}/f{i}.txt": f"file {i}\n".encode() * (i + 1)
                                    for i in range(30)} | {"skip/__pycache__/x.txt": b"no"})
    corpus = build_corpus([src], tmp_path / "cache", val_fraction=0.2)
    assert len(corpus.train_files) + len(corpus.val_files) == 30
    for split, files in ((corpus.train, corpus.train_files), (corpus.val, corpus.val_files)):
        assert bytes(split) == b"".join(Path(f).read_bytes() for f in files)
    bin_mtime = (tmp_path / "cache" / "train.bin").stat().st_mtime_ns
    again = build_corpus([src], tmp_path / "cache", val_fraction=0.2)
    assert again.key == corpus.key
    assert (tmp_path / "cache" / "train.bin").stat().st_mtime_ns == bin_mtime  # reused, not rewritten
    (src / "d0" / "f0.txt").write_bytes(b"changed\n")
    assert build_corpus([src], tmp_path / "cache", val_fraction=0.2).key != corpus.key


def test_suffix_filter_and_named_file(tmp_path):
    src = _write(tmp_path / "src", {"a.py": b"x = 1\n", "b.md": b"# b\n", "c.png": b"\x89PNG\0\0"})
    files = collect_files([src], suffixes=[".py", ".md"])
    assert [k for _, k in files] == ["a.py", "b.md"]
    assert [k for _, k in collect_files([src / "c.png"])] == ["c.png"]  # a named file whatever its suffix


def test_single_file_is_split_by_bytes(tmp_path):
    text = bytes(range(32, 127)) * 100  # 9500 bytes
    f = tmp_path / "one.txt"
    f.write_bytes(text)
    corpus = build_corpus([f], tmp_path / "c", val_fraction=0.1)
    assert corpus.train_files == corpus.val_files == (str(f.resolve()),)
    assert bytes(corpus.val) == text[-950:]
    assert bytes(corpus.train) + bytes(corpus.val) == text


def test_split_moves_nearest_file_when_a_side_is_empty():
    files = [(Path(f"/x/{k}"), k) for k in ("a", "b")]
    train, val = split_files(files, 1e-9)
    assert len(train) == len(val) == 1
    train, val = split_files(files, 1 - 1e-9)
    assert len(train) == len(val) == 1


# ---- errors ----

def test_missing_path(tmp_path):
    with pytest.raises(CorpusError, match=r"data path '.*nope' does not exist"):
        build_corpus([tmp_path / "nope"], tmp_path / "c")


def test_empty_folder_and_empty_list(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"empty corpus: no files under '.*empty'"):
        build_corpus([tmp_path / "empty"], tmp_path / "c")
    with pytest.raises(CorpusError, match="empty corpus: no data paths given"):
        build_corpus([], tmp_path / "c")
    _write(tmp_path / "src", {"a.txt": b"a"})
    with pytest.raises(CorpusError, match=r"empty corpus: no files ending in \.py under"):
        build_corpus([tmp_path / "src"], tmp_path / "c", suffixes=[".py"])


def test_files_with_no_bytes(tmp_path):
    src = _write(tmp_path / "src", {"a.txt": b"", "b.txt": b""})
    with pytest.raises(CorpusError, match=r"empty corpus: the train split of .*src has 0 bytes \(1 files\)"):
        build_corpus([src], tmp_path / "c")


def test_binary_file_is_named_and_nothing_is_left_behind(tmp_path):
    src = _write(tmp_path / "src", {f"t{i}.txt": b"text\n" for i in range(10)} | {"blob.bin": b"abc\0def"})
    with pytest.raises(CorpusError, match=r"binary file '.*blob\.bin': NUL byte at offset 3; the corpus "
                                          r"takes text files only"):
        build_corpus([src], tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.tmp")) and not (tmp_path / "c" / "corpus.json").exists()


def test_bad_val_fraction(tmp_path):
    with pytest.raises(CorpusError, match=r"val_fraction must be in \(0, 1\), got 1\.5"):
        build_corpus(None, tmp_path / "c", val_fraction=1.5)


def test_paths_must_be_a_sequence():
    with pytest.raises(TypeError, match=r"not the single path 'x\.txt'"):
        collect_files("x.txt")


# ---- batches ----

def test_batches_walk_each_epoch_in_a_permutation():
    stream = np.arange(1, 10 * 7 + 2, dtype=np.uint8)  # 71 bytes, seq 8 -> stride 7 -> 10 windows
    b = Batches(stream, batch=4, seq=8, seed=3)
    assert b.windows_per_epoch == 10
    rows = np.concatenate([b.batch_at(p) for p in range(0, 20, 4)])  # 20 windows = two epochs
    assert rows.dtype == np.int32 and rows.shape == (20, 8)
    starts = rows[:, 0] - 1
    assert np.all(starts % 7 == 0)
    assert sorted(starts[:10]) == sorted(starts[10:]) == list(range(0, 70, 7))
    assert list(starts[:10]) != list(starts[10:])  # a new permutation each epoch
    # every next-byte pair of the stream is a (input, target) pair exactly once per epoch
    pairs = sorted((int(r[i]), int(r[i + 1])) for r in rows[:10] for i in range(7))
    assert pairs == [(int(x), int(x) + 1) for x in stream[:-1]]
    np.testing.assert_array_equal(b.batch_at(8), Batches(stream, batch=4, seq=8, seed=3).batch_at(8))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(20, 400), seq=st.integers(2, 16), batch=st.integers(1, 5), pos=st.integers(0, 1000))
def test_batches_are_windows_of_the_stream(n, seq, batch, pos):
    stream = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
    if (n - 1) // (seq - 1) < batch:
        with pytest.raises(CorpusError, match="training split too small"):
            Batches(stream, batch=batch, seq=seq)
        return
    rows = Batches(stream, batch=batch, seq=seq).batch_at(pos)
    assert rows.shape == (batch, seq)
    for r in rows:
        hits = [s for s in range(0, n - seq + 1, seq - 1) if np.array_equal(stream[s:s + seq], r)]
        assert hits


def test_eval_batches_are_fixed_full_and_spread():
    stream = np.arange(200, dtype=np.uint8)
    got = list(eval_batches(stream, batch=3, seq=10, max_windows=10))
    assert [g.shape for g in got] == [(3, 10)] * 3  # 10 windows rounded down to 9
    starts = np.concatenate(got)[:, 0]
    assert starts[0] == 0 and starts[-1] == 21 * 9 and np.all(np.diff(starts) > 0)
    with pytest.raises(CorpusError, match=r"validation split too small: 20 bytes give 2 windows of seq=10 "
                                          r"bytes, fewer than batch=3"):
        list(eval_batches(stream[:20], batch=3, seq=10, max_windows=10))


def test_seq_too_short():
    with pytest.raises(CorpusError, match="seq must be >= 2"):
        Batches(np.zeros(10, np.uint8), batch=1, seq=1)


@pytest.mark.skipif(os.name != "posix", reason="needs os.mkfifo")
def test_unreadable_is_not_silent(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(CorpusError, match=r"data path '.*pipe' is neither a regular file nor a folder"):
        build_corpus([fifo], tmp_path / "c")
