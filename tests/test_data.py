"""Default corpus (megatron indexed files) and reading it back through megatron's GPTDataset."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import torch

from mone_train.data import corpus as corpus_mod
from mone_train.data.tokenizer import ByteTokenizer


def test_sources_are_sorted_stdlib_without_site_packages():
    sources = corpus_mod.stdlib_sources()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert sources == sorted(sources)
    assert len(sources) > 500
    assert all(p.suffix == ".py" and root in p.parents for p in sources)
    assert not any("site-packages" in p.parts for p in sources)


def test_corpus_round_trips_documents_and_splits_by_document(tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sources = [p for p in corpus_mod.stdlib_sources() if p.stat().st_size > 0][:12]
    monkeypatch.setattr(corpus_mod, "stdlib_sources", lambda: sources)
    built = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=4)
    eod = ByteTokenizer.eod

    expected = {"train": [], "valid": []}
    for i, path in enumerate(sources):
        expected["valid" if i % 4 == 3 else "train"].append(path.read_bytes())
    for split, prefix in [("train", built.train_prefix), ("valid", built.valid_prefix)]:
        dataset = IndexedDataset(prefix)
        assert len(dataset) == len(expected[split]) == built.manifest["splits"][split]["documents"]
        for doc, text in zip(dataset, expected[split]):
            assert doc[-1] == eod
            assert bytes(doc[:-1].astype(np.uint8)) == text
    assert built.manifest["splits"]["valid"]["documents"] == 3


def test_corpus_is_built_once(tmp_path, monkeypatch):
    sources = [p for p in corpus_mod.stdlib_sources() if p.stat().st_size > 0][:3]
    monkeypatch.setattr(corpus_mod, "stdlib_sources", lambda: sources)
    first = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=2)
    manifest = Path(first.train_prefix).parent / corpus_mod.MANIFEST
    stamp = manifest.stat().st_mtime_ns

    def must_not_rebuild():
        raise AssertionError("corpus rebuilt although complete")

    monkeypatch.setattr(corpus_mod, "stdlib_sources", must_not_rebuild)
    second = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=2)
    assert second == first and manifest.stat().st_mtime_ns == stamp
    # No staging folders are left beside the finished one.
    assert [p.name for p in manifest.parent.parent.iterdir()] == [manifest.parent.name]


def test_incomplete_corpus_is_rebuilt(tmp_path, monkeypatch):
    sources = [p for p in corpus_mod.stdlib_sources() if p.stat().st_size > 0][:3]
    monkeypatch.setattr(corpus_mod, "stdlib_sources", lambda: sources)
    target = tmp_path / "corpus" / corpus_mod.corpus_name(2)
    target.mkdir(parents=True)
    (target / "train.bin").write_bytes(b"half-written")  # no manifest: not complete
    built = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=2)
    assert json.loads((target / corpus_mod.MANIFEST).read_text()) == built.manifest


def test_gpt_dataset_samples_and_rank_slices(megatron_single, corpus, tmp_path):
    from mone_train.data.dataset import build_gpt_datasets, micro_batches

    train, valid = build_gpt_datasets(
        corpus.train_prefix, corpus.valid_prefix, ByteTokenizer(), 32, 1, 64, 8, tmp_path
    )
    sample = train[0]
    assert sample["tokens"].shape == (32,)
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(32))
    assert int(sample["tokens"].max()) <= ByteTokenizer.eod
    text = ByteTokenizer().detokenize(valid[0]["tokens"])
    assert len(text) > 0

    rank0 = next(micro_batches(train, 8, 2, dp_rank=0, dp_size=2))
    rank1 = next(micro_batches(train, 8, 2, dp_rank=1, dp_size=2))
    assert torch.equal(rank0["tokens"], torch.stack([train[8]["tokens"], train[9]["tokens"]]))
    assert torch.equal(rank1["tokens"], torch.stack([train[10]["tokens"], train[11]["tokens"]]))


def test_eval_seed_fixes_the_held_out_draw_whatever_the_training_seed(megatron_single, corpus,
                                                                      tmp_path):  # fmt: skip
    from mone_train.compose import compose_config
    from mone_train.data.run_data import build_run_data

    def draw(*overrides):
        cfg = compose_config(
            ["trainer.seq_length=32", f"data.index_cache_dir={tmp_path}", *overrides]
        )
        data = build_run_data(cfg, megatron_single, (16, 8, 8))
        return data.train[0]["tokens"], data.valid[0]["tokens"]

    train_1, valid_1 = draw("trainer.seed=1")
    train_2, valid_2 = draw("trainer.seed=2")
    assert not torch.equal(train_1, train_2) and not torch.equal(valid_1, valid_2)  # as before
    fixed_1 = draw("trainer.seed=1", "data.eval_seed=7")
    fixed_2 = draw("trainer.seed=2", "data.eval_seed=7")
    assert torch.equal(fixed_1[1], fixed_2[1])  # the same held-out samples
    assert torch.equal(fixed_1[0], train_1) and torch.equal(fixed_2[0], train_2)  # own order
