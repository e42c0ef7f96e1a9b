"""Token blocks for training and evaluation, their on-disk cache, and the batch samplers.

A *block* is `context_len + rollout_len + 1` consecutive token ids: the dense prefill, the teacher-forced decode
steps, and the last target. As in the reference, every document is tokenized without special tokens (no BOS) and
all documents are joined into one stream with no separator; the stream is cut into consecutive non-overlapping
blocks and the tail is dropped. Sources: the shipped WikiText-2 (`wikitext2_local`), local text/JSONL/CSV/Parquet
files, or a `datasets` hub dataset (streamed). See data/README.md.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from utils.cli import SOLError

REPO_ROOT = Path(__file__).resolve().parents[1]
WIKITEXT2_DIR = REPO_ROOT / "data" / "wikitext-2"
LOCAL_DEFAULT = "wikitext2_local"

HUB_TRAIN_ROWS = 1_000_000  # the reference reads at most this many streamed rows for train ...
HUB_OTHER_ROWS = 2_000  # ... and this many for any other split
TOKENIZE_BATCH = 512  # texts per tokenizer call (reference)
CACHE_VERSION = 1  # bump when the block layout or the key changes

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "dev", "test", "validation")
_SPLIT_ALIASES = {"val": "validation", "valid": "validation"}
_TAIL_SPLITS = ("train", "dev")  # splits carved out of one block sequence by the dev tail
_PROBE = "SOL probe: The quick brown fox, 1,234 <unk> @-@ tokens."  # fingerprints the tokenizer in the key


class DataError(SOLError, ValueError):
    """A data problem the user can fix (missing file, wrong column, too little text); one-line message."""


def block_len(cfg: Any) -> int:
    """Tokens per block: prefill + decode steps + the final target."""
    return int(cfg.context_len) + int(cfg.rollout_len) + 1


# ---------------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------------

def _resolve_split(cfg: Any, split: str) -> str:
    """Map aliases ('eval' → cfg.eval_split, 'val'/'valid' → 'validation') to a split name."""
    if split == "eval":
        split = cfg.eval_split
    return _SPLIT_ALIASES.get(split, split)


def _is_local(name: str) -> bool:
    """A dataset_name is a local path if it exists, looks like a path, or names a supported file type."""
    if "{split}" in name or name.startswith(("/", "./", "../", "~")):
        return True
    return Path(name).expanduser().exists() or Path(name).suffix.lower() in FORMATS


def _local_files(path_str: str) -> list[Path]:
    """Resolve a file or a directory (all files of its single supported extension) to a sorted file list."""
    path = Path(path_str).expanduser().resolve()
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"unsupported data file extension '{path.suffix}' ({path}); use one of {sorted(FORMATS)}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)
    if not files:
        raise DataError(f"no data files with a supported extension {sorted(FORMATS)} in directory {path}")
    exts = sorted({p.suffix.lower() for p in files})
    if len(exts) > 1:
        raise DataError(f"directory {path} mixes data file types {exts}; keep one type per directory")
    return files


def _source_files(cfg: Any, split: str) -> list[Path]:
    """The files a local split reads: WikiText-2 mapping, or the user's path with `{split}` substituted."""
    if cfg.dataset_name == LOCAL_DEFAULT:
        name = "test.txt" if split == "test" else "valid.txt"
        path = WIKITEXT2_DIR / name
        if not path.is_file():
            raise DataError(f"shipped WikiText-2 file missing: {path}")
        return [path]
    name = str(cfg.dataset_name)
    if "{split}" in name:  # train and dev both read the train file; dev is its tail
        name = name.replace("{split}", "train" if split in _TAIL_SPLITS else split)
    return _local_files(name)


def _read_texts(files: list[Path], text_field: str) -> list[str]:
    """All non-empty documents of local files, in file order: one per line for .txt, one per row otherwise."""
    fmt = FORMATS[files[0].suffix.lower()]
    if fmt == "text":
        texts: list[str] = []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                texts.extend(line for line in fh if line.strip())  # keep each line as is, newline included
        return texts
    from datasets import load_dataset

    ds = load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    if text_field not in ds.column_names:
        raise DataError(f"text_field '{text_field}' not in {files[0].name}; columns present: {ds.column_names}")
    return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]


def _hub_texts(cfg: Any, split: str) -> Iterator[str]:
    """Stream non-empty texts of a hub dataset ('dev' reads the hub's 'validation' split), capped like the
    reference (HUB_TRAIN_ROWS for train, HUB_OTHER_ROWS otherwise) and scaled by dataset_pct."""
    hub_split = "validation" if split == "dev" else split
    cap = HUB_TRAIN_ROWS if split == "train" else HUB_OTHER_ROWS
    limit = max(1, int(cap * float(cfg.dataset_pct) / 100.0))
    name, field = cfg.dataset_name, cfg.text_field
    try:
        from datasets import load_dataset

        ds = load_dataset(name, cfg.dataset_config, split=hub_split, streaming=True)
        rows = iter(itertools.islice(ds, limit))
        first = next(rows, None)
    except Exception as e:  # network, unknown name, unknown split: all end here
        raise _hub_error(cfg, hub_split, e) from None
    if first is None:
        return
    if field not in first:
        raise DataError(f"text_field '{field}' not in hub dataset '{name}'; columns present: {sorted(first)}")
    try:
        for row in itertools.chain([first], rows):
            text = row.get(field)
            if isinstance(text, str) and text.strip():
                yield text
    except Exception as e:  # the connection dropped mid-stream
        raise _hub_error(cfg, hub_split, e) from None


def _hub_error(cfg: Any, hub_split: str, e: Exception) -> DataError:
    """One-line error for a hub dataset that cannot be read, pointing at the offline alternatives."""
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    return DataError(
        f"could not load '{cfg.dataset_name}' (config {cfg.dataset_config}, split {hub_split}) as a local path or "
        f"a hub dataset: {type(e).__name__}: {reason}. If this machine is offline, use dataset_name: "
        f"{LOCAL_DEFAULT} or a local file/directory")


def _take_pct(texts: list[str], pct: float) -> list[str]:
    """The first pct% of the documents (at least one when there are any)."""
    if not 0.0 < pct <= 100.0:
        raise DataError(f"dataset_pct must be in (0, 100], got {pct}")
    if pct >= 100.0 or not texts:
        return texts
    return texts[: max(1, int(len(texts) * pct / 100.0))]


# ---------------------------------------------------------------------------------------------------------
# tokenization and blocks
# ---------------------------------------------------------------------------------------------------------

def _token_stream(texts: Iterable[str], tokenizer: Any, max_tokens: Optional[int] = None) -> np.ndarray:
    """Tokenize in batches without special tokens and join everything into one int32 stream (no separator).
    Stops early once `max_tokens` are collected (the prefix, hence the blocks, is the same)."""
    chunks: list[np.ndarray] = []
    total = 0
    it = iter(texts)
    while max_tokens is None or total < max_tokens:
        batch = list(itertools.islice(it, TOKENIZE_BATCH))
        if not batch:
            break
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64)
        chunks.append(flat.astype(np.int32))
        total += flat.size
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _cut_blocks(stream: np.ndarray, blen: int, where: str) -> np.ndarray:
    """Consecutive non-overlapping blocks of `blen` tokens; the tail is dropped."""
    n = stream.size // blen
    if n == 0:
        raise DataError(f"{where} yields zero blocks: only {stream.size} tokens, need at least {blen} per block")
    return stream[: n * blen].reshape(n, blen)


def _dev_count(n_blocks: int, dev_fraction: float) -> int:
    """Blocks in the dev tail: round(dev_fraction * n), at least 1 when dev_fraction > 0."""
    if dev_fraction <= 0:
        return 0
    return min(n_blocks, max(1, int(round(dev_fraction * n_blocks))))


def _build(cfg: Any, tokenizer: Any, split: str, files: list[Path]) -> np.ndarray:
    """Read, tokenize and cut the blocks of one split (no cache)."""
    blen, max_blocks = block_len(cfg), cfg.max_blocks
    where = f"split '{split}' of '{cfg.dataset_name}'"
    if not files:  # hub dataset, streamed
        cap = max_blocks * blen if max_blocks else None
        blocks = _cut_blocks(_token_stream(_hub_texts(cfg, split), tokenizer, cap), blen, where)
    else:
        texts = _take_pct(_read_texts(files, cfg.text_field), float(cfg.dataset_pct))
        tail = split in _TAIL_SPLITS
        cap = max_blocks * blen if (max_blocks and not tail) else None  # the dev tail needs the whole stream
        blocks = _cut_blocks(_token_stream(texts, tokenizer, cap), blen, where)
        if tail:
            n_dev = _dev_count(len(blocks), float(cfg.dev_fraction))
            blocks = blocks[len(blocks) - n_dev:] if split == "dev" else blocks[: len(blocks) - n_dev]
            if len(blocks) == 0:
                raise DataError(f"{where} yields zero blocks after the dev tail (dev_fraction={cfg.dev_fraction})")
    if max_blocks:
        blocks = blocks[: int(max_blocks)]
    return np.ascontiguousarray(blocks, dtype=np.int32)


# ---------------------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------------------

def _cache_meta(cfg: Any, tokenizer: Any, split: str, files: list[Path]) -> dict:
    """Everything that determines the blocks of this split; its sha1 names the cache file."""
    meta: dict[str, Any] = {
        "version": CACHE_VERSION,
        "dataset_name": str(cfg.dataset_name),
        "dataset_config": cfg.dataset_config,
        "split": split,
        "text_field": cfg.text_field if not (files and files[0].suffix.lower() == ".txt") else None,
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "tokenizer_probe": list(tokenizer([_PROBE], add_special_tokens=False)["input_ids"][0]),
        "block_len": block_len(cfg),
        "max_blocks": cfg.max_blocks,
        "dataset_pct": float(cfg.dataset_pct),
    }
    if files and split in _TAIL_SPLITS:
        meta["dev_fraction"] = float(cfg.dev_fraction)
    if not files:
        meta["row_limit"] = HUB_TRAIN_ROWS if split == "train" else HUB_OTHER_ROWS
    return meta


def _atomic_write(path: Path, write: Any) -> None:
    """Write via a temp file in the same directory and os.replace, so readers never see a partial file."""
    from utils.io import atomic_write

    atomic_write(path, write, binary=True)


def _dist() -> tuple[Any, int]:
    """(torch.distributed module or None, rank) when a process group is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None, 0
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank()
    return None, 0


def load_blocks(cfg: Any, tokenizer: Any, split: str) -> np.ndarray:
    """Int32 blocks [N, block_len(cfg)] of a split ('train', 'dev', 'test', 'validation'; 'eval' means
    cfg.eval_split), built once and then read (mmap) from `block_cache_dir/{split}-{sha1}.npy`.
    Under torch.distributed, rank 0 builds the cache and the other ranks wait at a barrier."""
    split = _resolve_split(cfg, split)
    local = cfg.dataset_name == LOCAL_DEFAULT or _is_local(str(cfg.dataset_name))
    if local and split not in SPLITS:
        raise DataError(f"unknown split '{split}' for a local source; use one of {list(SPLITS)} or 'eval'")
    files = _source_files(cfg, split) if local else []
    meta = _cache_meta(cfg, tokenizer, split, files)
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cfg.block_cache_dir).expanduser()
    npy, meta_path = cache_dir / f"{split}-{key}.npy", cache_dir / f"{split}-{key}.json"

    dist, rank = _dist()
    error: Optional[BaseException] = None
    if rank == 0 and not npy.exists():
        try:
            blocks = _build(cfg, tokenizer, split, files)
            cache_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(npy, lambda fh: np.save(fh, blocks))
            info = {**meta, "n_blocks": int(blocks.shape[0]), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            _atomic_write(meta_path, lambda fh: fh.write(json.dumps(info, indent=1).encode()))
        except BaseException as e:  # still meet the barrier so the other ranks do not hang
            error = e
    if dist is not None:
        dist.barrier()
    if error is not None:
        raise error
    if not npy.exists():
        raise DataError(f"rank {rank}: block cache {npy} missing after rank 0 built it (is block_cache_dir shared?)")
    return np.load(npy, mmap_mode="r")


# ---------------------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------------------

class BlockSampler:
    """Deterministic, resumable batches of block indices for training.

    Epoch e shuffles all blocks with `np.random.default_rng(seed + e)`; rank r takes the strided shard
    perm[r::world_size] (every rank the same length, so DDP ranks step together); batches of `batch_size`
    with drop_last; only the first max(1, int(train_fraction * batches_per_epoch)) batches of each epoch are
    used. The position advances before a batch is yielded, so a `state_dict()` taken after processing a batch
    resumes at the next one.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 epochs: int = 1, train_fraction: float = 1.0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        self.n_blocks, self.batch_size, self.seed = int(n_blocks), int(batch_size), int(seed)
        self.rank, self.world_size, self.epochs = int(rank), int(world_size), int(epochs)
        self.train_fraction = float(train_fraction)
        self.per_rank = self.n_blocks // self.world_size
        full = self.per_rank // self.batch_size
        if full == 0:
            raise DataError(f"{n_blocks} blocks over {world_size} rank(s) give no full batch of {batch_size}")
        self.batches_per_epoch = max(1, int(self.train_fraction * full))
        self.epoch, self.batch = 0, 0

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        perm = np.random.default_rng(self.seed + epoch).permutation(self.n_blocks)
        return perm[: self.per_rank * self.world_size][self.rank::self.world_size]

    def __iter__(self) -> Iterator[np.ndarray]:
        while self.epoch < self.epochs:
            idx = self._epoch_indices(self.epoch)
            while self.batch < self.batches_per_epoch:
                b = self.batch
                self.batch += 1
                yield idx[b * self.batch_size:(b + 1) * self.batch_size]
            self.epoch, self.batch = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "n_blocks": self.n_blocks, "batch_size": self.batch_size,
                "seed": self.seed, "world_size": self.world_size, "train_fraction": self.train_fraction}

    def load_state_dict(self, d: dict) -> None:
        """Restore the position; the sampling settings must match, or the order would silently change."""
        for k in ("n_blocks", "batch_size", "seed", "world_size", "train_fraction"):
            if k in d and d[k] != getattr(self, k):
                raise ValueError(f"BlockSampler state has {k}={d[k]}, this run has {getattr(self, k)}")
        self.epoch, self.batch = int(d["epoch"]), int(d["batch"])


def eval_batches(blocks: np.ndarray, batch_size: int, n_batches: Optional[int] = None) -> Iterator[np.ndarray]:
    """Consecutive batches of blocks [batch_size, L] (copies, in order, drop_last), the first n_batches."""
    total = len(blocks) // batch_size
    if n_batches is not None:
        total = min(total, max(0, int(n_batches)))
    for b in range(total):
        yield np.array(blocks[b * batch_size:(b + 1) * batch_size])
