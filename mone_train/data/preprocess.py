"""``mone-preprocess``: text files and JSONL dumps -> a megatron-core indexed dataset.

    mone-preprocess --input data/ more.jsonl.gz --output-prefix out/web \\
        --tokenizer-type hf --tokenizer tok.json --workers 4

Inputs are files or directories (searched recursively for ``.txt``, ``.jsonl`` and
``.jsonl.gz``). A ``.txt`` file is one document; every line of a JSONL file is one document,
its text under ``--json-key``. Each document is tokenized, an end-of-document token appended,
and written with megatron-core's ``IndexedDatasetBuilder`` to ``<prefix>.bin`` / ``.idx``, in a
token dtype chosen from the vocabulary size. ``<prefix>.meta.json`` records the tokenizer and
the counts, so training can check it reads data made with its own tokenizer.

Documents are read in input order and tokenized by ``--workers`` processes; results are written
in input order, so the output bytes do not depend on the worker count. Everything is written
under temporary names and renamed into place at the end: an interrupted or failed run leaves
no output under the final names, and an existing output is never overwritten without
``--overwrite``.

Bad input stops with one line naming the file (and line): a missing or empty input, a JSON line
that does not parse or lacks the key (``--skip-bad-lines`` counts and skips those instead).
Bytes that are not UTF-8 are replaced (U+FFFD) and the documents affected are counted.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mone_train.data.tokenizer import build_tokenizer
from mone_train.errors import ConfigError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
META_SUFFIX = ".meta.json"
BATCH_DOCUMENTS = 256


class PreprocessError(ConfigError):
    """Bad input; the message names the file (and line) and what was expected."""


@dataclass
class Stats:
    """Counts reported at the end and stored in ``<prefix>.meta.json``."""

    files: int = 0
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    empty_documents: int = 0
    skipped_lines: int = 0
    documents_with_replaced_bytes: int = 0
    seconds: float = 0.0
    first_skipped: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading


def find_inputs(inputs: list[str]) -> list[Path]:
    """Input files in order: given files as they are, directories searched recursively (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
            if not found:
                raise PreprocessError(
                    f"input directory {path} holds no {', '.join(SUFFIXES)} files"
                )
            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(SUFFIXES):
                raise PreprocessError(
                    f"input file {path} is not one of {', '.join(SUFFIXES)} "
                    "(plain text: rename it .txt)"
                )
            files.append(path)
        else:
            raise PreprocessError(f"input {path} does not exist")
    for path in files:
        if path.stat().st_size == 0:
            raise PreprocessError(f"input file {path} is empty")
    return files


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def read_records(files: list[Path], stats: Stats) -> Iterator[tuple[str, int, bytes, bool]]:
    """``(file, line, raw bytes, is_json)`` per document candidate, in input order."""
    for path in files:
        stats.files += 1
        if not _is_jsonl(path):
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise PreprocessError(f"input file {path} cannot be read ({err})") from None
            stats.input_bytes += len(raw)
            yield str(path), 0, raw, False
            continue
        opener = gzip.open if path.name.endswith(".gz") else open
        try:
            with opener(path, "rb") as f:
                for number, line in enumerate(f, start=1):
                    stats.input_bytes += len(line)
                    if line.strip():
                        yield str(path), number, line, True
        except (OSError, EOFError) as err:  # e.g. a truncated or not-gzip .gz file
            raise PreprocessError(f"input file {path} cannot be read ({err})") from None


# ---------------------------------------------------------------------------------------------
# Tokenizing (in worker processes when --workers > 1)

_worker_tokenizer = None
_worker_options: dict = {}


def _init_worker(kind: str, path: str | None, eod_token: str | None, options: dict) -> None:
    global _worker_tokenizer, _worker_options
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _worker_tokenizer = build_tokenizer(kind, path, eod_token)
    _worker_options = options


def decode_record(
    record: tuple[str, int, bytes, bool], json_key: str
) -> tuple[str | None, str, bool]:
    """``(text or None, problem, had replaced bytes)`` of one record."""
    source, number, raw, is_json = record
    try:
        text, replaced = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, replaced = raw.decode("utf-8", errors="replace"), True
    if not is_json:
        return text, "", replaced
    where = f"{source}:{number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"{where}: not valid JSON ({err.msg} at column {err.colno})", replaced
    if not isinstance(obj, dict):
        return None, f"{where}: expected a JSON object, found {type(obj).__name__}", replaced
    if json_key not in obj:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        return None, f"{where}: no key {json_key!r} (keys: {keys}); set --json-key", replaced
    value = obj[json_key]
    if not isinstance(value, str):
        return None, f"{where}: {json_key!r} is {type(value).__name__}, not a string", replaced
    return value, "", replaced


def _tokenize_batch(records: list[tuple[str, int, bytes, bool]]) -> list[tuple]:
    """Per record: ``("ok", tokens, replaced)``, ``("empty", None, replaced)`` or ``("bad", msg)``."""
    tokenizer, options = _worker_tokenizer, _worker_options
    decoded = [decode_record(r, options["json_key"]) for r in records]
    texts = [text for text, _, _ in decoded if text]
    encoded = iter(tokenizer.tokenize_batch(texts)) if texts else iter(())
    out = []
    for text, problem, replaced in decoded:
        if text is None:
            out.append(("bad", problem, replaced))
        elif not text:
            out.append(("empty", None, replaced))
        else:
            tokens = next(encoded)
            if options["append_eod"]:
                tokens = np.append(tokens, tokenizer.eod)
            out.append(("ok", tokens, replaced))
    return out


def _batches(records: Iterator, size: int) -> Iterator[list]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Writing


def output_paths(prefix: str | Path) -> dict[str, Path]:
    prefix = Path(prefix).expanduser()
    return {
        "bin": prefix.with_name(prefix.name + ".bin"),
        "idx": prefix.with_name(prefix.name + ".idx"),
        "meta": prefix.with_name(prefix.name + META_SUFFIX),
    }


def preprocess(
    inputs: list[str],
    output_prefix: str,
    *,
    tokenizer_type: str = "byte",
    tokenizer_path: str | None = None,
    eod_token: str | None = None,
    json_key: str = "text",
    workers: int = 1,
    skip_bad_lines: bool = False,
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.meta.json``; return the summary."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if workers < 1:
        raise PreprocessError(f"--workers={workers}: expected an integer >= 1")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_path, eod_token)
    finals = _free_outputs(output_prefix, overwrite)
    files = find_inputs(inputs)
    prefix = finals["bin"].with_suffix("")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{prefix.name}.tmp-{os.getpid()}"
    temps = {key: prefix.parent / f"{tag}.{key}" for key in finals}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    options = {"json_key": json_key, "append_eod": append_eod}

    stats = Stats()
    start = time.perf_counter()
    pool = bar = None
    try:
        builder = IndexedDatasetBuilder(str(temps["bin"]), dtype=dtype)
        batches = _batches(read_records(files, stats), BATCH_DOCUMENTS)
        if workers == 1:
            _init_worker(tokenizer_type, tokenizer_path, eod_token, options)
            results = map(_tokenize_batch, batches)
        else:
            pool = multiprocessing.get_context("fork").Pool(
                workers,
                initializer=_init_worker,
                initargs=(tokenizer_type, tokenizer_path, eod_token, options),
            )
            results = pool.imap(_tokenize_batch, batches)  # ordered: output independent of N
        bar = tqdm(desc="preprocessing", unit="doc", disable=not progress, dynamic_ncols=True)
        _add_documents(results, builder, dtype, stats, skip_bad_lines, bar)
        if stats.documents == 0:
            raise PreprocessError(
                f"no documents found in {', '.join(str(f) for f in files[:3])}"
                + (" ..." if len(files) > 3 else "")
            )
        builder.finalize(str(temps["idx"]))
        stats.seconds = time.perf_counter() - start
        stats.output_bytes = temps["bin"].stat().st_size + temps["idx"].stat().st_size
        summary = {
            "tokenizer": tokenizer.describe(),
            "token_dtype": np.dtype(dtype).name,
            "append_eod": append_eod,
            "json_key": json_key,
            "inputs": [str(f) for f in files],
            **asdict(stats),
        }
        temps["meta"].write_text(json.dumps(summary, indent=2) + "\n")
        for key in ("bin", "idx", "meta"):
            os.replace(temps[key], finals[key])
        summary["output_prefix"] = str(prefix)
        return summary
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _free_outputs(output_prefix: str, overwrite: bool) -> dict[str, Path]:
    """The output paths; an existing one is an error unless ``overwrite``."""
    finals = output_paths(output_prefix)
    existing = [str(p) for p in finals.values() if p.exists()]
    if existing and not overwrite:
        raise PreprocessError(
            f"output {existing[0]} already exists (pass --overwrite to replace it)"
        )
    return finals


def _add_documents(results, builder, dtype, stats: Stats, skip_bad_lines: bool, bar) -> None:
    """Append each tokenized batch's documents to ``builder``, counting what was skipped."""
    start = time.perf_counter()
    for batch in results:
        for status, payload, replaced in batch:
            stats.documents_with_replaced_bytes += int(replaced)
            if status == "bad":
                if not skip_bad_lines:
                    raise PreprocessError(f"{payload} (--skip-bad-lines skips such lines)")
                stats.skipped_lines += 1
                if len(stats.first_skipped) < 5:
                    stats.first_skipped.append(payload)
                continue
            if status == "empty":
                stats.empty_documents += 1
                continue
            builder.add_document(payload.astype(dtype, copy=False), [len(payload)])
            stats.documents += 1
            stats.tokens += len(payload)
        bar.update(len(batch))
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(
            docs_s=f"{stats.documents / elapsed:,.0f}", tok_s=f"{stats.tokens / elapsed:,.0f}"
        )


def read_meta(prefix: str | Path) -> dict | None:
    """The ``.meta.json`` written beside a preprocessed dataset, or None (e.g. other tools')."""
    path = output_paths(prefix)["meta"]
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def format_summary(s: dict) -> str:
    mib = s["output_bytes"] / 2**20
    rate = s["tokens"] / max(s["seconds"], 1e-9)
    lines = [
        f"wrote {s['output_prefix']}.{{bin,idx}} ({mib:,.1f} MiB, {s['token_dtype']} tokens, "
        f"vocabulary {s['tokenizer']['vocab_size']:,} from {s['tokenizer']['kind']})",
        f"  {s['documents']:,} documents, {s['tokens']:,} tokens from {s['files']:,} files "
        f"({s['input_bytes'] / 2**20:,.1f} MiB) in {s['seconds']:.1f} s ({rate:,.0f} tokens/s)",
    ]
    if s["skipped_lines"]:
        lines.append(f"  skipped {s['skipped_lines']:,} bad lines, first: {s['first_skipped'][0]}")
    if s["empty_documents"]:
        lines.append(f"  skipped {s['empty_documents']:,} empty documents")
    if s["documents_with_replaced_bytes"]:
        lines.append(
            f"  replaced non-UTF-8 bytes in {s['documents_with_replaced_bytes']:,} documents"
        )
    return "\n".join(lines)
