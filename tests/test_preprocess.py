"""Real corpora: mone-preprocess, the tokenizer kinds, mone-tokenizer, blends and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from mone_train.compose import compose_config
from mone_train.config import validate
from mone_train.data import preprocess as pp
from mone_train.data.bpe import train_bpe
from mone_train.data.cli import preprocess_main, tokenizer_main
from mone_train.data.tokenizer import TokenizerError, build_tokenizer
from mone_train.errors import ConfigError

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Mixture of neuron experts keeps the top-k neurons per token.",
    "ünïcödé — text, 数字 and emoji 🙂",
    "x = [i * i for i in range(10)]\n",
] * 5


def _write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bpe")
    corpus = _write_jsonl(folder / "train.jsonl", DOCS * 4)
    out = folder / "tok.json"
    train_bpe([corpus], out, vocab_size=300, min_frequency=1, progress=False)
    return out


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    text = folder / "text.txt"
    text.write_text("\n".join(DOCS * 4))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(folder / "sp"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=3,
        minloglevel=2,
    )
    return folder / "sp.model"


def _tokenizer_args(kind, bpe_file, spm_file):
    return {"byte": (None,), "hf": (str(bpe_file),), "sentencepiece": (str(spm_file),)}[kind]


@pytest.mark.parametrize("kind", ["byte", "hf", "sentencepiece"])
def test_round_trip_through_megatron_indexed_dataset(tmp_path, kind, bpe_file, spm_file):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (path,) = _tokenizer_args(kind, bpe_file, spm_file)
    tokenizer = build_tokenizer(kind, path)
    source = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    summary = pp.preprocess(
        [str(source)],
        str(tmp_path / "out" / "ds"),
        tokenizer_type=kind,
        tokenizer_path=path,
        progress=False,
    )
    dataset = IndexedDataset(str(tmp_path / "out" / "ds"))
    assert len(dataset) == len(DOCS) == summary["documents"]
    assert dataset.index.dtype == (np.uint16 if tokenizer.vocab_size < 65500 else np.int32)
    total = 0
    for doc, text in zip(dataset, DOCS):
        expected = np.append(tokenizer.tokenize(text), tokenizer.eod)
        np.testing.assert_array_equal(doc, expected)
        total += len(doc)
        if kind != "sentencepiece":  # SentencePiece normalises whitespace
            assert tokenizer.detokenize(doc[:-1]) == text
    assert summary["tokens"] == total
    meta = pp.read_meta(tmp_path / "out" / "ds")
    assert meta["tokenizer"] == tokenizer.describe() and meta["documents"] == len(DOCS)


def test_worker_count_does_not_change_the_output(tmp_path, bpe_file):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] * (1 + i % 3) for i in range(700)]
    source = _write_jsonl(tmp_path / "docs.jsonl", docs)
    outputs = {}
    for workers in (1, 3):
        prefix = tmp_path / f"w{workers}"
        pp.preprocess(
            [str(source)],
            str(prefix),
            tokenizer_type="hf",
            tokenizer_path=str(bpe_file),
            workers=workers,
            progress=False,
        )
        outputs[workers] = [
            (prefix.parent / f"{prefix.name}.{s}").read_bytes() for s in "bin idx".split()
        ]
    assert outputs[1] == outputs[3]


def test_txt_jsonl_gz_and_directories(tmp_path):
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("whole file is one document")
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "first"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    (folder / "ignored.csv").write_text("not an input")
    summary = pp.preprocess(
        [str(tmp_path / "in")], str(tmp_path / "ds"), json_key="body", progress=False
    )
    assert summary["files"] == 2 and summary["documents"] == 3  # the blank line is no document


def test_blend_samples_in_proportion_to_weights(tmp_path, megatron_single):
    from mone_train.data.dataset import build_blended_datasets

    tokenizer = build_tokenizer("byte")
    prefixes = []
    for name, letter in [("a", "a"), ("b", "b")]:
        source = _write_jsonl(tmp_path / f"{name}.jsonl", [letter * 300] * 40)
        pp.preprocess([str(source)], str(tmp_path / name), progress=False)
        prefixes.append(str(tmp_path / name))
    train, valid, test = build_blended_datasets(
        prefixes, [3.0, 1.0], [90, 5, 5], tokenizer, 32, 1, (2000, 100, 100), tmp_path / "cache"
    )
    assert test is not None
    ids = np.array([int(train[i]["dataset_id"]) for i in range(2000)])
    share = float((ids == 0).mean())
    assert abs(share - 0.75) < 0.02, share
    # dataset 0 really is "a" text, dataset 1 "b"
    first = train[int(np.flatnonzero(ids == 0)[0])]["tokens"]
    assert set(first.tolist()) <= {ord("a"), tokenizer.eod}


@pytest.mark.slow
def test_tiny_training_run_on_preprocessed_jsonl_with_trained_bpe(tmp_path):
    from mone_train.trainer import run

    docs = [(DOCS[i % len(DOCS)] + f" {i} ") * 20 for i in range(200)]
    source = _write_jsonl(tmp_path / "corpus.jsonl", docs)
    tok = tmp_path / "tok.json"
    assert (
        tokenizer_main(
            [
                "train",
                "--input",
                str(source),
                "--vocab-size",
                "320",
                "--output",
                str(tok),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        preprocess_main(
            [
                "--input",
                str(source),
                "--output-prefix",
                str(tmp_path / "data" / "corpus"),
                "--tokenizer-type",
                "hf",
                "--tokenizer",
                str(tok),
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    cfg = compose_config(
        [
            "model=tiny",
            "trainer=smoke",
            "trainer.steps=12",
            "trainer.eval_iters=2",
            f"trainer.run_dir={tmp_path / 'run'}",
            "logging.wandb_mode=disabled",
            "data=indexed",
            f"data.paths=[{tmp_path / 'data' / 'corpus'}]",
            "data.split=[80,10,10]",
            f"data.index_cache_dir={tmp_path / 'cache'}",
            "data.tokenizer.type=hf",
            f"data.tokenizer.path={tok}",
        ]
    )
    summary = run(cfg)
    assert summary["vocab_size"] == 320  # flowed from the tokenizer into the model
    assert np.isfinite(summary["val_loss"]) and np.isfinite(summary["test_loss"])
    assert summary["val_loss"] < np.log(320)  # learned something beyond uniform


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, argv) -> str:
    assert preprocess_main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mone-preprocess: ")
    return err[0]


def test_missing_and_empty_inputs(tmp_path, capsys):
    assert "does not exist" in _fails(
        capsys, ["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")]
    )
    (tmp_path / "empty.jsonl").write_text("")
    line = _fails(
        capsys, ["--input", str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "o")]
    )
    assert "empty.jsonl is empty" in line
    (tmp_path / "dir").mkdir()
    assert "holds no" in _fails(
        capsys, ["--input", str(tmp_path / "dir"), "--output-prefix", str(tmp_path / "o")]
    )
    assert list(tmp_path.glob("o*")) == [] and list(tmp_path.glob(".o*")) == []


def test_bad_json_line_stops_with_file_and_line_or_is_skipped(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": f"doc {i}"}) for i in range(600)]
    source.write_text("\n".join(good[:500] + ['{"text": broken'] + good[500:]) + "\n")
    line = _fails(capsys, ["--input", str(source), "--output-prefix", str(tmp_path / "o")])
    assert f"{source}:501: not valid JSON" in line and "--skip-bad-lines" in line
    # The 500 documents before the bad line were written, but never under the final name.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]

    assert (
        preprocess_main(
            [
                "--input",
                str(source),
                "--output-prefix",
                str(tmp_path / "o"),
                "--skip-bad-lines",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "skipped 1 bad lines" in out and f"{source}:501" in out
    assert pp.read_meta(tmp_path / "o")["documents"] == 600


def test_missing_key_and_non_utf8(tmp_path, capsys):
    source = tmp_path / "k.jsonl"
    source.write_text(json.dumps({"content": "x"}) + "\n")
    line = _fails(capsys, ["--input", str(source), "--output-prefix", str(tmp_path / "o")])
    assert f"{source}:1: no key 'text'" in line and "content" in line and "--json-key" in line

    raw = tmp_path / "latin1.txt"
    raw.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    summary = pp.preprocess([str(raw)], str(tmp_path / "l"), progress=False)
    assert summary["documents_with_replaced_bytes"] == 1 and summary["documents"] == 1
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(tmp_path / "l"))  # keep it: items are views of its mmap
    doc = dataset[0]
    assert bytes(doc[:-1].astype(np.uint8)).decode() == "caf\ufffd cr\ufffdme"


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "d.jsonl", DOCS[:2])
    pp.preprocess([str(source)], str(tmp_path / "o"), progress=False)
    before = (tmp_path / "o.bin").read_bytes()
    _write_jsonl(source, DOCS[2:4])
    line = _fails(capsys, ["--input", str(source), "--output-prefix", str(tmp_path / "o")])
    assert "already exists" in line and "--overwrite" in line
    assert (tmp_path / "o.bin").read_bytes() == before


def test_bad_tokenizer_files(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "d.jsonl", DOCS[:2])
    base = ["--input", str(source), "--output-prefix", str(tmp_path / "o")]
    line = _fails(capsys, [*base, "--tokenizer-type", "hf", "--tokenizer", str(tmp_path / "x")])
    assert "does not exist" in line
    junk = tmp_path / "junk.json"
    junk.write_text("{not a tokenizer")
    line = _fails(capsys, [*base, "--tokenizer-type", "hf", "--tokenizer", str(junk)])
    assert "junk.json is not a Hugging Face tokenizer.json" in line
    line = _fails(capsys, [*base, "--tokenizer-type", "sentencepiece", "--tokenizer", str(junk)])
    assert "junk.json is not a SentencePiece model" in line
    with pytest.raises(TokenizerError, match="needs data.tokenizer.path"):
        build_tokenizer("hf", None)


def test_bad_blend_configs(tmp_path, megatron_single, bpe_file):
    from mone_train.data.dataset import DataError, build_blended_datasets

    base = ["data=indexed", "data.paths=[a,b]"]
    with pytest.raises(ConfigError, match=r"data.weights=\[1.0\].*one weight per path \(2 paths\)"):
        validate(compose_config([*base, "data.weights=[1.0]"]))
    with pytest.raises(ConfigError, match="data.weights.*> 0"):
        validate(compose_config([*base, "data.weights=[1.0,-1.0]"]))
    with pytest.raises(ConfigError, match="data.paths=\\[\\]"):
        validate(compose_config(["data=indexed"]))
    with pytest.raises(
        ConfigError, match=r"data.split=\[90.0, 10.0\] is invalid: expected three shares"
    ):
        validate(compose_config([*base, "data.split=[90,10]"]))

    byte = build_tokenizer("byte")
    with pytest.raises(DataError, match=r"data.paths\[0\]=.*nope.bin does not exist"):
        build_blended_datasets(
            [str(tmp_path / "nope")], None, [98, 2, 0], byte, 8, 1, (10, 2, 2), tmp_path
        )
    source = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    pp.preprocess(
        [str(source)],
        str(tmp_path / "ds"),
        tokenizer_type="hf",
        tokenizer_path=str(bpe_file),
        progress=False,
    )
    with pytest.raises(
        DataError, match=r"tokenized with hf \(vocabulary 300.*data.tokenizer is byte"
    ):
        build_blended_datasets(
            [str(tmp_path / "ds")], None, [98, 2, 0], byte, 8, 1, (10, 2, 2), tmp_path
        )


def test_tokenizer_cli_refuses_bad_vocab_and_overwrite(tmp_path, capsys, bpe_file):
    source = _write_jsonl(tmp_path / "d.jsonl", DOCS)
    argv = ["train", "--input", str(source), "--output", str(bpe_file), "--quiet"]
    assert tokenizer_main([*argv, "--vocab-size", "100"]) == 2
    assert "--vocab-size=100" in capsys.readouterr().err
    before = bpe_file.read_bytes()
    assert tokenizer_main([*argv, "--vocab-size", "300"]) == 2
    assert "already exists" in capsys.readouterr().err and bpe_file.read_bytes() == before


def test_default_corpus_with_a_bpe_tokenizer_is_cached_apart(tmp_path, monkeypatch, bpe_file):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from mone_train.data import corpus as corpus_mod

    sources = [p for p in corpus_mod.stdlib_sources() if p.stat().st_size > 0][:6]
    monkeypatch.setattr(corpus_mod, "stdlib_sources", lambda: sources)
    bpe = build_tokenizer("hf", str(bpe_file))
    built = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=3, tokenizer=bpe)
    as_bytes = corpus_mod.prepare_stdlib_corpus(tmp_path, valid_every=3)
    assert f"-hf-{bpe.fingerprint}-" in built.train_prefix
    assert built.train_prefix != as_bytes.train_prefix
    train = IndexedDataset(built.train_prefix)
    expected = np.append(bpe.tokenize(sources[0].read_text()), bpe.eod)
    np.testing.assert_array_equal(train[0], expected)
    assert built.manifest["tokenizer"] == bpe.describe()


def test_split_that_leaves_a_share_empty_is_refused(tmp_path, megatron_single):
    from mone_train.data.dataset import DataError, build_blended_datasets

    source = _write_jsonl(tmp_path / "few.jsonl", DOCS[:10])
    pp.preprocess([str(source)], str(tmp_path / "few"), progress=False)
    byte = build_tokenizer("byte")
    # 10 documents: a 2 % valid share rounds to none (megatron would loop forever on it).
    with pytest.raises(DataError, match=r"has 10 documents, too few for .*valid share gets none"):
        build_blended_datasets([str(tmp_path / "few")], None, [98, 2, 0], byte, 8, 1,
                               (10, 2, 2), tmp_path / "cache")  # fmt: skip
    train, valid, test = build_blended_datasets(
        [str(tmp_path / "few")], None, [80, 20, 0], byte, 8, 1, (10, 2, 2), tmp_path / "cache"
    )
    assert test is None and len(valid) > 0


def test_unsupported_input_suffix_and_eod_token_for_sentencepiece(tmp_path, capsys, spm_file):
    (tmp_path / "data.csv").write_text("a,b\n")
    line = _fails(
        capsys, ["--input", str(tmp_path / "data.csv"), "--output-prefix", str(tmp_path / "o")]
    )
    assert "data.csv is not one of .txt, .jsonl, .jsonl.gz" in line
    with pytest.raises(TokenizerError, match="only be named for hf"):
        build_tokenizer("sentencepiece", str(spm_file), "</s>")
    with pytest.raises(ConfigError, match="data.tokenizer.eod_token"):
        validate(compose_config(["data.tokenizer.eod_token='</s>'"]))
