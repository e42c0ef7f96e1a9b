"""Tests of utils/data.py: block layout, splits, sources, cache, errors, samplers. Offline, tiny tokenizers."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from utils import data as D
from utils.data import BlockSampler, DataError, block_len, eval_batches, load_blocks

WIKI = Path(D.__file__).resolve().parents[1] / "data" / "wikitext-2"
TEXT = ["the cat sat on the mat\n", "   \n", "a dog ran in the park\n", "\n", "the end of the story is near\n",
        "one two three four five six seven\n"]


def make_tokenizer(lines, name: str = "test/wordlevel") -> PreTrainedTokenizerFast:
    """A real word-level HF tokenizer trained offline on `lines`, with a BOS post-processor (that must NOT
    appear in blocks because the data path tokenizes with add_special_tokens=False)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.name_or_path = name
    return fast


@pytest.fixture(scope="module")
def wiki_tok():
    lines = []
    for f in ("valid.txt", "test.txt"):
        lines += (WIKI / f).read_text(encoding="utf-8").splitlines()
    return make_tokenizer(lines, "test/wiki-wordlevel")


@pytest.fixture(scope="module")
def small_tok():
    return make_tokenizer(TEXT)


def cfg(tmp_path, **kw):
    base = dict(dataset_name="wikitext2_local", dataset_config=None, text_field="text", train_split="train",
                eval_split="test", context_len=3, rollout_len=1, max_blocks=None, dataset_pct=100.0,
                train_fraction=1.0, dev_fraction=0.1, block_cache_dir=str(tmp_path / "cache"), batch_size=2,
                seed=0, epochs=1)
    base.update(kw)
    return types.SimpleNamespace(**base)


def stream_of(tok, texts):
    ids = tok([t for t in texts if t.strip()], add_special_tokens=False)["input_ids"]
    return np.array([i for seq in ids for i in seq], dtype=np.int32)


# ---- block layout -----------------------------------------------------------------------------------------

def test_blocks_are_consecutive_slices_of_the_stream(tmp_path, small_tok):
    src = tmp_path / "small.txt"
    src.write_text("".join(TEXT))
    c = cfg(tmp_path, dataset_name=str(src), dev_fraction=0.0)
    blocks = load_blocks(c, small_tok, "train")
    L = block_len(c)
    stream = stream_of(small_tok, TEXT)
    assert L == 5 and blocks.dtype == np.int32 and blocks.shape == (len(stream) // L, L)
    np.testing.assert_array_equal(np.asarray(blocks).ravel(), stream[: blocks.size])
    bos = small_tok.bos_token_id
    assert bos not in blocks and small_tok("the cat")["input_ids"][0] == bos  # BOS exists but is not used
    assert len(load_blocks(cfg(tmp_path, dataset_name=str(src), dev_fraction=0.0, max_blocks=2), small_tok,
                           "train")) == 2


def test_wikitext_train_dev_tail_and_pct(tmp_path, wiki_tok):
    c = cfg(tmp_path, context_len=96, rollout_len=31, dataset_pct=20.0)
    train, dev, whole = (load_blocks(c, wiki_tok, s) for s in ("train", "dev", "validation"))
    assert len(dev) == round(0.1 * len(whole)) and len(train) + len(dev) == len(whole)
    np.testing.assert_array_equal(dev, whole[-len(dev):])  # dev is the fixed tail ...
    np.testing.assert_array_equal(train, whole[: len(train)])  # ... and train the rest: disjoint
    lines = [ln for ln in (WIKI / "valid.txt").open(encoding="utf-8") if ln.strip()]
    stream = stream_of(wiki_tok, lines[: int(len(lines) * 0.2)])
    np.testing.assert_array_equal(np.asarray(whole).ravel(), stream[: whole.size])
    half = load_blocks(cfg(tmp_path, context_len=96, rollout_len=31, dataset_pct=10.0), wiki_tok, "validation")
    assert abs(len(half) / len(whole) - 0.5) < 0.05  # dataset_pct scales the source
    assert len(load_blocks(cfg(tmp_path, context_len=96, rollout_len=31, dataset_pct=20.0, max_blocks=3),
                           wiki_tok, "dev")) == 3


def test_test_split_reads_test_txt(tmp_path, wiki_tok):
    c = cfg(tmp_path, context_len=64, rollout_len=15, dataset_pct=5.0, max_blocks=4)
    test = load_blocks(c, wiki_tok, "eval")  # eval_split = test
    lines = [ln for ln in (WIKI / "test.txt").open(encoding="utf-8") if ln.strip()]
    np.testing.assert_array_equal(np.asarray(test).ravel(), stream_of(wiki_tok, lines[:50])[: test.size])
    assert test.shape == (4, 80)


# ---- cache ------------------------------------------------------------------------------------------------

def test_cache_hit_new_key_and_atomic_write(tmp_path, small_tok):
    src = tmp_path / "small.txt"
    src.write_text("".join(TEXT))
    c = cfg(tmp_path, dataset_name=str(src), dev_fraction=0.0)
    a = load_blocks(c, small_tok, "train")
    cache = Path(c.block_cache_dir)
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and files[0].startswith("train-") and {Path(f).suffix for f in files} == {".json", ".npy"}
    meta = json.loads((cache / files[0]).read_text())
    assert meta["n_blocks"] == len(a) and meta["tokenizer"] == "test/wordlevel"
    mtime = (cache / files[1]).stat().st_mtime_ns
    b = load_blocks(c, small_tok, "train")
    assert isinstance(b, np.memmap) and (cache / files[1]).stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(a, b)
    load_blocks(cfg(tmp_path, dataset_name=str(src), dev_fraction=0.0, rollout_len=2), small_tok, "train")
    assert len(list(cache.glob("*.npy"))) == 2  # a new block length is a new cache file
    assert not [f for f in os.listdir(cache) if f.endswith(".tmp")]  # atomic write leaves no temp file
    src.write_text("".join(TEXT) + "more words here for a change\n")  # changed file → new key
    load_blocks(c, small_tok, "train")
    assert len(list(cache.glob("*.npy"))) == 3


def test_wikitext_lines_kept_as_is():
    texts = D._read_texts([WIKI / "valid.txt"], "text")
    assert texts[0] == " = Homarus gammarus = \n" and all(t.strip() for t in texts)
    assert any("<unk>" in t for t in texts) and any(" @-@ " in t for t in texts)


def test_single_process_group_barrier(tmp_path, small_tok):
    import torch.distributed as dist

    src = tmp_path / "small.txt"
    src.write_text("".join(TEXT))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        blocks = load_blocks(cfg(tmp_path, dataset_name=str(src), dev_fraction=0.0), small_tok, "train")
    finally:
        dist.destroy_process_group()
    assert blocks.shape == (len(stream_of(small_tok, TEXT)) // 5, 5)


# ---- hub datasets (datasets.load_dataset replaced: no network here) ---------------------------------------

def test_hub_streaming_split_mapping_limits_and_field(tmp_path, small_tok, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, streaming=False, **kw):
        calls.append((name, config, split, streaming))
        return ({"text": TEXT[i % len(TEXT)], "id": i} for i in range(10_000))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    c = cfg(tmp_path, dataset_name="wikitext", dataset_config="wikitext-2-raw-v1")
    dev = load_blocks(c, small_tok, "dev")
    assert calls[-1] == ("wikitext", "wikitext-2-raw-v1", "validation", True)
    rows = [TEXT[i % len(TEXT)] for i in range(D.HUB_OTHER_ROWS)]  # only the first 2,000 rows
    assert len(dev) == len(stream_of(small_tok, rows)) // 5
    capped = load_blocks(cfg(tmp_path, dataset_name="wikitext", max_blocks=7), small_tok, "train")
    assert calls[-1][2] == "train" and len(capped) == 7
    with pytest.raises(DataError, match=r"text_field 'body'.*\['id', 'text'\]"):
        load_blocks(cfg(tmp_path, dataset_name="wikitext", text_field="body"), small_tok, "test")


def test_hub_network_failure_is_one_line(tmp_path, small_tok, monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="offline.*wikitext2_local") as e:
        load_blocks(cfg(tmp_path, dataset_name="wikitext", dataset_config="wikitext-2-raw-v1"), small_tok, "train")
    assert "\n" not in str(e.value) and "ConnectionError" in str(e.value)


# ---- local formats ----------------------------------------------------------------------------------------

def test_jsonl_csv_parquet_with_text_field(tmp_path, small_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [t for t in TEXT if t.strip()]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs)))
    rows = ["id,body"] + [f'{i},"{t.strip()}"' for i, t in enumerate(docs)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "d.parquet")
    expected = stream_of(small_tok, docs)
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        c = cfg(tmp_path, dataset_name=str(tmp_path / name), text_field="body", dev_fraction=0.0)
        blocks = load_blocks(c, small_tok, "train")
        np.testing.assert_array_equal(np.asarray(blocks).ravel(), expected[: blocks.size])
        with pytest.raises(DataError, match=r"columns present: \['id', 'body'\]") as e:
            load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / name), text_field="text"), small_tok, "train")
        assert "\n" not in str(e.value)


def test_split_placeholder_and_directory(tmp_path, small_tok):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text("".join(TEXT))
    (tmp_path / "corpus" / "test.txt").write_text("one two three four five six seven\n" * 2)
    c = cfg(tmp_path, dataset_name=str(tmp_path / "corpus" / "{split}.txt"), dev_fraction=0.0)
    test = load_blocks(c, small_tok, "test")
    np.testing.assert_array_equal(np.asarray(test).ravel(), stream_of(small_tok, [TEXT[-1]] * 2)[: test.size])
    (tmp_path / "corpus" / "train.txt").unlink()
    both = load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / "corpus")), small_tok, "validation")
    np.testing.assert_array_equal(both, test)
    (tmp_path / "corpus" / "x.csv").write_text("text\nsome words\n")
    with pytest.raises(DataError, match="mixes data file types"):
        load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / "corpus")), small_tok, "validation")


# ---- errors -----------------------------------------------------------------------------------------------

def test_errors_are_one_line(tmp_path, small_tok):
    with pytest.raises(DataError, match="not found") as e:
        load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / "nope.txt")), small_tok, "train")
    assert "\n" not in str(e.value)
    (tmp_path / "a.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported"):
        load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / "a.xml")), small_tok, "train")
    (tmp_path / "tiny.txt").write_text("the cat\n")
    with pytest.raises(DataError, match=r"zero blocks: only 2 tokens, need at least 5 per block") as e:
        load_blocks(cfg(tmp_path, dataset_name=str(tmp_path / "tiny.txt")), small_tok, "train")
    assert "\n" not in str(e.value)
    assert not list(tmp_path.glob("cache/*.npy"))  # a failed build leaves no cache file
    with pytest.raises(DataError, match="unknown split"):
        load_blocks(cfg(tmp_path), small_tok, "bogus")


# ---- samplers ---------------------------------------------------------------------------------------------

def test_block_sampler_determinism_fraction_and_ranks():
    a = [b.tolist() for b in BlockSampler(100, 4, seed=1, epochs=2)]
    assert a == [b.tolist() for b in BlockSampler(100, 4, seed=1, epochs=2)]
    assert a != [b.tolist() for b in BlockSampler(100, 4, seed=2, epochs=2)]
    assert len(a) == 50 == len(BlockSampler(100, 4, seed=1, epochs=2)) and all(len(b) == 4 for b in a)
    assert sorted(sum(a[:25], [])) == list(range(100)) and a[:25] != a[25:]  # each epoch a new permutation
    s = BlockSampler(100, 4, seed=1, train_fraction=0.36)
    assert len(s) == 9 == len(list(s))
    np.testing.assert_array_equal(np.concatenate(list(BlockSampler(100, 4, 1, train_fraction=0.36))),
                                  np.concatenate(a[:9]))  # the first batches of the epoch
    assert len(BlockSampler(10, 4, seed=0, train_fraction=0.01)) == 1
    r0 = np.concatenate(list(BlockSampler(101, 5, seed=3, rank=0, world_size=2)))
    r1 = np.concatenate(list(BlockSampler(101, 5, seed=3, rank=1, world_size=2)))
    assert len(r0) == len(r1) == 50 and not set(r0) & set(r1)
    with pytest.raises(DataError):
        BlockSampler(3, 4, seed=0)


def test_block_sampler_resume():
    full = [b.tolist() for b in BlockSampler(60, 4, seed=7, epochs=3, train_fraction=0.5)]
    s = BlockSampler(60, 4, seed=7, epochs=3, train_fraction=0.5)
    it = iter(s)
    head = [next(it).tolist() for _ in range(10)]  # stop in the middle of epoch 2 (7 batches per epoch)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["epoch"] == 1 and state["batch"] == 3
    r = BlockSampler(60, 4, seed=7, epochs=3, train_fraction=0.5)
    r.load_state_dict(state)
    assert head + [b.tolist() for b in r] == full
    with pytest.raises(ValueError, match="seed"):
        BlockSampler(60, 4, seed=8, epochs=3, train_fraction=0.5).load_state_dict(state)


def test_eval_batches_order_and_count():
    blocks = np.arange(11 * 3, dtype=np.int32).reshape(11, 3)
    out = list(eval_batches(blocks, 4, None))
    assert len(out) == 2
    np.testing.assert_array_equal(np.concatenate(out), blocks[:8])
    assert len(list(eval_batches(blocks, 2, 3))) == 3 and len(list(eval_batches(blocks, 2, 99))) == 5
