"""Byte-level text corpora for ``remat train``: files -> memory-mapped ``uint8`` streams -> batches.

Tokens are raw bytes (vocabulary 256, no tokenizer). The default corpus is the
running CPython's own standard library (every ``.py`` file under
``sysconfig.get_paths()["stdlib"]``, minus ``site-packages``/``dist-packages``
and test folders), so real text is present on every machine with no download.

Files are streamed, in chunks, into two flat byte files ``train.bin`` and
``val.bin`` in a cache folder and read back with :class:`numpy.memmap`: the
corpus is never one Python string, and a second run over the same files
reuses the cache. The train/validation split is by file and deterministic
(a hash of each file's path relative to the folder it was found under), as
in the per-document splits of GPT-2-style data pipelines.

Batches are fixed windows of ``seq`` bytes (not the random offsets that
nanoGPT's ``get_batch`` draws every step): window ``i`` starts at byte
``i * (seq - 1)`` so consecutive windows share one byte and every next-byte
target is seen once per epoch; each epoch visits the windows in a seeded
permutation. A batch is a pure function of the *data position* (windows
consumed so far), which is what a checkpoint records to resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from remat import _compat
from remat._errors import CorpusError
from remat._files import replaced, write_text

_compat.hide_frames(__file__)

_CHUNK = 1 << 20
_CACHE_VERSION = 1
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})
"""Folder names skipped when walking the standard library (and ``__pycache__`` everywhere)."""


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``sysconfig.get_paths()["stdlib"]``).

    Raises:
      CorpusError: the folder does not exist (e.g. an embedded, zipped stdlib).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"the standard library folder {str(root)!r} of this Python does not exist "
                          "(zipped or embedded stdlib?); name text files or folders with --data")
    return root


def stdlib_files() -> list[Path]:
    """The default corpus: every ``*.py`` file of the running CPython's standard library.

    Walks :func:`stdlib_root` without following symlinks, skipping folders named in
    :data:`EXCLUDED_DIRS` (``site-packages``, ``dist-packages``, ``__pycache__``, ``test``,
    ``tests``, ``idle_test``) and hidden folders. Sorted, so the list (and hence the split)
    is the same on every run.

    Raises:
      CorpusError: no ``.py`` file found there.
    """
    root = stdlib_root()
    files = _walk(root, suffixes=(".py",), skip=EXCLUDED_DIRS)
    if not files:
        raise CorpusError(f"empty corpus: no .py files under the standard library folder {str(root)!r}")
    return files


def _walk(root: Path, *, suffixes: Sequence[str] | None, skip: frozenset[str]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or (suffixes and not name.endswith(tuple(suffixes))):
                continue
            p = Path(dirpath, name)
            if p.is_file():
                out.append(p)
    return sorted(out)


def collect_files(paths: Sequence[str | os.PathLike] | None = None, *,
                  suffixes: Sequence[str] | None = None) -> list[tuple[Path, str]]:
    """The corpus files with their split keys, sorted and de-duplicated.

    Args:
      paths: files and/or folders; ``None`` means the standard library (:func:`stdlib_files`).
        A named file is taken whatever its suffix; a folder is walked recursively, skipping
        hidden entries and ``__pycache__``.
      suffixes: keep only files ending in one of these (e.g. ``(".py", ".md")``) when walking
        folders; ``None`` keeps every file.

    Returns:
      ``[(path, key)]``: ``key`` is the path relative to the named folder (the file name for
      a named file, the stdlib-relative path by default), POSIX-style; it decides the split.

    Raises:
      CorpusError: a path does not exist, is neither file nor folder, or nothing is found.
    """
    if paths is None:
        root = stdlib_root()
        return [(p, p.relative_to(root).as_posix()) for p in stdlib_files()]
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"paths must be a sequence of paths, not the single path {paths!r}")
    if not paths:
        raise CorpusError("empty corpus: no data paths given")
    found: dict[Path, str] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CorpusError(f"data path {str(raw)!r} does not exist")
        if path.is_file():
            found.setdefault(path.resolve(), path.name)
        elif path.is_dir():
            for f in _walk(path, suffixes=suffixes, skip=frozenset({"__pycache__"})):
                found.setdefault(f.resolve(), f.relative_to(path).as_posix())
        else:
            raise CorpusError(f"data path {str(raw)!r} is neither a regular file nor a folder")
    if not found:
        where = ", ".join(repr(str(p)) for p in paths)
        only = f" ending in {', '.join(suffixes)}" if suffixes else ""
        raise CorpusError(f"empty corpus: no files{only} under {where}")
    return sorted(found.items(), key=lambda kv: (kv[1], str(kv[0])))


def _hash_unit(key: str) -> float:
    """A deterministic number in [0, 1) from a split key (first 32 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") / 2**32


def split_files(files: Sequence[tuple[Path, str]], val_fraction: float
                ) -> tuple[list[Path], list[Path]]:
    """Split files into (train, validation) by a hash of their keys.

    A file goes to validation when ``sha256(key)`` mapped to [0, 1) is below
    ``val_fraction``, so about that fraction of files (not bytes) is held out,
    independent of file order and machine. If one side ends up empty, the file whose
    hash lies nearest the threshold moves to it. A single file cannot be split by
    file: it comes back as ``([file], [])`` and :func:`build_corpus` splits its bytes.

    Raises:
      CorpusError: ``val_fraction`` not in (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if len(files) == 1:
        return [files[0][0]], []
    scored = sorted(((_hash_unit(k), i) for i, (_, k) in enumerate(files)))
    val_idx = {i for u, i in scored if u < val_fraction}
    if not val_idx:
        val_idx = {scored[0][1]}
    elif len(val_idx) == len(files):
        val_idx.discard(scored[-1][1])
    train = [p for i, (p, _) in enumerate(files) if i not in val_idx]
    val = [p for i, (p, _) in enumerate(files) if i in val_idx]
    return train, val


@dataclass(frozen=True)
class Corpus:
    """A byte corpus split into two memory-mapped streams.

    Attributes:
      train: ``uint8[N_train]`` memory map of the training files, concatenated in order.
      val: ``uint8[N_val]`` memory map of the validation files.
      train_files, val_files: the source files in stream order (one file split by bytes
        appears in both).
      key: SHA-256 hex digest of the file list, sizes, mtimes and split settings; a
        cached build is reused only when it matches.
      cache_dir: where ``train.bin``, ``val.bin`` and ``corpus.json`` live.
    """

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    key: str
    cache_dir: Path = field(compare=False)

    def summary(self) -> str:
        """One line: file and byte counts of both splits."""
        return (f"corpus: {len(self.train_files)} train files ({self.train.size:,} bytes), "
                f"{len(self.val_files)} validation files ({self.val.size:,} bytes)")


def _corpus_key(files: Sequence[tuple[Path, str]], val_fraction: float) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION} val_fraction={val_fraction!r}\n".encode())
    for path, key in files:
        st = path.stat()
        h.update(f"{key}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _copy_text(path: Path, out, limit: int | None = None, skip: int = 0) -> int:
    """Stream ``path`` (bytes ``skip`` .. ``skip+limit``) into ``out``; reject NUL bytes."""
    n = 0
    with open(path, "rb") as f:
        f.seek(skip)
        while limit is None or n < limit:
            chunk = f.read(_CHUNK if limit is None else min(_CHUNK, limit - n))
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise CorpusError(
                    f"binary file {str(path)!r}: NUL byte at offset {skip + n + nul}; the corpus takes "
                    "text files only (name text files/folders, or filter folders with --data-ext)")
            out.write(chunk)
            n += len(chunk)
    return n


def build_corpus(paths: Sequence[str | os.PathLike] | None, cache_dir: str | os.PathLike, *,
                 val_fraction: float = 0.1, suffixes: Sequence[str] | None = None) -> Corpus:
    """Collect, split and concatenate a corpus into ``cache_dir``; return its memory maps.

    Files are copied in 1 MiB chunks into ``train.bin`` / ``val.bin`` (written to a
    temporary name, then renamed), with ``corpus.json`` recording the file lists and
    :attr:`Corpus.key`. When ``corpus.json`` already matches, nothing is copied.
    A single file is split by bytes: its last ``val_fraction`` goes to validation.

    Args:
      paths: as for :func:`collect_files` (``None``: the standard library).
      cache_dir: folder for the byte files (created if missing).
      val_fraction: share of files (or of the single file's bytes) held out, in (0, 1).
      suffixes: as for :func:`collect_files`.

    Raises:
      CorpusError: a bad path, an empty corpus or split (zero bytes), or a binary file
        (one containing a NUL byte), naming the file.
    """
    files = collect_files(paths, suffixes=suffixes)
    train_paths, val_paths = split_files(files, val_fraction)
    key = _corpus_key(files, val_fraction)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "corpus.json"
    bins = {"train": cache / "train.bin", "val": cache / "val.bin"}

    cached = json.loads(meta_path.read_text()) if meta_path.exists() else None
    if not (cached and cached["key"] == key
            and all(bins[s].exists() and bins[s].stat().st_size == cached[f"{s}_bytes"] for s in bins)):
        meta_path.unlink(missing_ok=True)
        sizes: dict[str, int] = {}
        plans: dict[str, list[tuple[Path, int | None, int]]] = {
            "train": [(p, None, 0) for p in train_paths], "val": [(p, None, 0) for p in val_paths]}
        if not val_paths:  # one file: split its bytes
            (only,) = train_paths
            total = only.stat().st_size
            n_val = int(total * val_fraction)
            plans = {"train": [(only, total - n_val, 0)], "val": [(only, n_val, total - n_val)]}
        for split, plan in plans.items():
            with replaced(bins[split]) as tmp, open(tmp, "wb") as out:
                sizes[split] = sum(_copy_text(p, out, limit, skip) for p, limit, skip in plan)
        cached = {"key": key, "val_fraction": val_fraction,
                  "train_bytes": sizes["train"], "val_bytes": sizes["val"],
                  "train_files": [str(p) for p, _, _ in plans["train"]],
                  "val_files": [str(p) for p, _, _ in plans["val"]]}
        write_text(meta_path, json.dumps(cached, indent=1))

    for split in bins:
        if cached[f"{split}_bytes"] == 0:
            where = "the standard library" if paths is None else ", ".join(map(str, paths))
            raise CorpusError(f"empty corpus: the {split} split of {where} has 0 bytes "
                              f"({len(cached[f'{split}_files'])} files)")
    return Corpus(train=np.memmap(bins["train"], dtype=np.uint8, mode="r"),
                  val=np.memmap(bins["val"], dtype=np.uint8, mode="r"),
                  train_files=tuple(cached["train_files"]), val_files=tuple(cached["val_files"]),
                  key=key, cache_dir=cache)


def num_windows(stream: np.ndarray, seq: int) -> int:
    """How many ``seq``-byte windows (stride ``seq - 1``) fit in a byte stream."""
    if seq < 2:
        raise CorpusError(f"seq must be >= 2 (one input and one target byte), got {seq}")
    return max(0, (stream.size - 1) // (seq - 1))


def _windows(stream: np.ndarray, starts: np.ndarray, seq: int) -> np.ndarray:
    return np.stack([stream[s:s + seq] for s in starts]).astype(np.int32)


@dataclass(frozen=True)
class Batches:
    """Shuffled, epoch-wise training batches over a byte stream, addressed by data position.

    ``batch_at(position)`` returns windows ``position .. position + batch - 1`` of the
    infinite sequence "epoch 0 in permutation ``rng([seed, 0])``, epoch 1 in
    permutation ``rng([seed, 1])``, ...". It holds no state, so a resumed run that
    restores the position sees exactly the same batches.

    Attributes:
      stream: ``uint8[N]`` byte stream (e.g. :attr:`Corpus.train`).
      batch: rows per batch, ``B``.
      seq: bytes per row, ``T`` (the model input length; ``T - 1`` targets per row).
      seed: permutation seed.

    Raises:
      CorpusError: the stream holds fewer than ``batch`` windows of ``seq`` bytes.
    """

    stream: np.ndarray
    batch: int
    seq: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise CorpusError(f"batch must be >= 1, got {self.batch}")
        n = num_windows(self.stream, self.seq)
        if n < self.batch:
            raise CorpusError(f"training split too small: {self.stream.size:,} bytes give {n} windows of "
                              f"seq={self.seq} bytes, fewer than batch={self.batch}")

    @property
    def windows_per_epoch(self) -> int:
        """Windows in one pass over the stream."""
        return num_windows(self.stream, self.seq)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)

    def batch_at(self, position: int) -> np.ndarray:
        """``int32[B, T]`` tokens (byte values 0..255) for data position ``position`` (windows
        consumed before this batch; advance it by ``batch`` per step)."""
        n = self.windows_per_epoch
        idx = np.arange(position, position + self.batch)
        epochs = idx // n
        perms = {int(e): self._perm(int(e)) for e in np.unique(epochs)}
        starts = np.array([perms[int(e)][i % n] for e, i in zip(epochs, idx, strict=True)]) * (self.seq - 1)
        return _windows(self.stream, starts, self.seq)


def eval_batches(stream: np.ndarray, *, batch: int, seq: int, max_windows: int) -> Iterator[np.ndarray]:
    """Fixed validation batches: ``int32[B, T]`` windows evenly spaced over the stream.

    Takes ``min(max_windows, windows in stream)`` rounded down to a multiple of
    ``batch``, so every batch is full and the mean of batch losses is the mean
    over all windows.

    Raises:
      CorpusError: the stream holds fewer than ``batch`` windows.
    """
    n = min(max_windows, num_windows(stream, seq)) // batch * batch
    if n == 0:
        raise CorpusError(f"validation split too small: {stream.size:,} bytes give "
                          f"{num_windows(stream, seq)} windows of seq={seq} bytes, fewer than batch={batch}")
    starts = np.linspace(0, num_windows(stream, seq) - 1, n).astype(np.int64) * (seq - 1)
    for i in range(0, n, batch):
        yield _windows(stream, starts[i:i + batch], seq)
