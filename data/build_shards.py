#!/usr/bin/env python3
"""Build challenge-format token shards (and optionally a tokenizer) from raw text.

Inputs
    JSON-lines files (one document per line, text in field ``--text-field``, default ``text``)
    or plain-text files, where documents are blocks separated by one or more blank lines
    (so a document itself never contains a blank line). The format is taken from the file
    name (``.jsonl``/``.json`` = JSON lines, anything else = plain text) unless ``--format``
    says otherwise. ``.xz`` and ``.gz`` files are decompressed on the fly. Documents that are
    empty or whitespace-only are skipped. All documents are held in memory. A missing file,
    binary or undecodable input, or an input without any document stops the build with one
    line naming that file, before anything is written.

Split
    Documents (in input order) are shuffled with a seeded, version-independent order: by
    SHA-256 of ``"{seed}:{index}"``. The first ``--val-docs`` documents of that order are
    validation, the rest are training; no document is in both.

Tokenizer
    Either trained here on the training documents only, with the challenge spec (SentencePiece
    BPE, character_coverage=0.999, byte_fallback, split_digits, nmt_nfkc, no dummy prefix,
    pad/bos/eos/unk = 0/1/2/3), written as ``tokenizer.model`` + ``tokenizer.vocab``; or an
    existing model given with ``--tokenizer``, checked and copied into the output directory.
    Training is single-threaded and reads no paths, so rebuilding gives byte-identical files.

Shards
    Challenge format: 256 little-endian int32 header words ([0] magic 20240520, [1] version 1,
    [2] token count N), then N little-endian uint16 tokens. Each document is BOS (id 1)
    followed by its tokens, no EOS. Shards hold at most ``--shard-tokens`` tokens; a document
    may continue from one shard into the next (readers concatenate shards in order).
    Files: ``fineweb_val_000000.bin``, ... and ``fineweb_train_000000.bin``, ... plus
    ``manifest.json`` with counts per split and per shard.

Output
    Everything is written into a hidden staging folder inside ``--out`` and moved into place
    only when the whole build succeeded. A failure at any point (a vocabulary too large for
    the text, an interrupt) removes the staging folder and any folder this run created;
    files that were there before stay as they were. Shards, tokenizer or manifest already in
    ``--out`` are replaced only with ``--overwrite``.

Example
    python data/build_shards.py docs.jsonl.xz --out /tmp/shards --val-docs 1000
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import TextIO
from collections.abc import Iterable, Iterator

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The shard format, its reader and the data error type live in train_gpt.py (the trainer reads
# what this script writes): one definition of the format.
from train_gpt import (  # noqa: E402,F401
    BOS_ID,
    MAX_VOCAB_SIZE,
    SHARD_HEADER_BYTES,
    SHARD_MAGIC,
    SHARD_VERSION,
    DataError,
    read_shard,
)

# The challenge's tokenizer spec; vocab_size is added per build.
TOKENIZER_SPEC = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
)
SP_DEFAULT_MAX_SENTENCE_BYTES = 4192
ENCODE_BATCH_DOCS = 256
PROGRESS_INTERVAL_S = 2.0
SHARD_NAME_PATTERN = "fineweb_{split}_{index:06d}.bin"
MANIFEST_FORMAT = {  # the shard format, described for readers of manifest.json
    "magic": SHARD_MAGIC,
    "version": SHARD_VERSION,
    "header_int32s": SHARD_HEADER_BYTES // 4,
    "token_dtype": "uint16 little-endian",
    "document_layout": "BOS (id 1) + tokens, no EOS; documents may span shards",
}


# ---------------------------------------------------------------------------- shard files


def write_shard(path: str | os.PathLike, tokens: Iterable[int] | np.ndarray) -> None:
    """Write ``tokens`` as one challenge-format shard."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise DataError(f"{path}: tokens must be a 1-D sequence, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= MAX_VOCAB_SIZE):
        raise DataError(f"{path}: token ids must fit in uint16 (0..{MAX_VOCAB_SIZE - 1})")
    header = np.zeros(SHARD_HEADER_BYTES // 4, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, array.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(array.astype("<u2", copy=False).tobytes())


class ShardWriter:
    """Streams tokens of one split into shards of at most ``shard_tokens`` tokens."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.filled = 0
        self.shards: list[dict] = []

    @property
    def tokens_written(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.filled

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            take = min(tokens.size, self.buffer.size - self.filled)
            self.buffer[self.filled : self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == self.buffer.size:
                self._flush()

    def close(self) -> list[dict]:
        if self.filled:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = SHARD_NAME_PATTERN.format(split=self.split, index=len(self.shards))
        write_shard(self.out_dir / name, self.buffer[: self.filled])
        self.shards.append({"file": name, "tokens": self.filled})
        self.filled = 0


# ---------------------------------------------------------------------------- documents


def open_text(path: Path) -> TextIO:
    """Open a possibly .xz/.gz-compressed UTF-8 text file."""
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def detect_format(path: Path) -> str:
    name = path.name
    for compression in (".xz", ".gz"):
        name = name.removesuffix(compression)
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


# What a binary or corrupt input raises while being read as (possibly compressed) UTF-8 text.
UNREADABLE_INPUT_ERRORS = (UnicodeDecodeError, lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error)


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; a NUL byte marks binary input, which UTF-8 alone allows."""
    with open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if "\0" in line:
                raise DataError(f"{path}:{line_number}: NUL byte: binary input, not text")
            yield line_number, line


def read_jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    for line_number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_number}: invalid JSON ({exc})") from exc
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{line_number}: no string field {text_field!r}")
        yield text


def read_text_documents(path: Path) -> Iterator[str]:
    """Yield blank-line-separated blocks; line breaks inside a block are kept."""
    block: list[str] = []
    for _, line in numbered_lines(path):
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def check_inputs_exist(paths: list[Path]) -> None:
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: input file not found")
        if not path.is_file():
            raise DataError(f"{path}: input is not a file")


def documents_of(path: Path, fmt: str, text_field: str) -> list[str]:
    """All documents of one input, empty ones included; unreadable or document-less input fails."""
    path_format = detect_format(path) if fmt == "auto" else fmt
    reader = read_jsonl_documents(path, text_field) if path_format == "jsonl" else read_text_documents(path)
    try:
        texts = list(reader)
    except UNREADABLE_INPUT_ERRORS as exc:
        raise DataError(
            f"{path}: not readable as UTF-8 {path_format} ({type(exc).__name__}): binary input?"
        ) from exc
    if not any(text.strip() for text in texts):
        raise DataError(f"{path}: no documents (the input is empty or whitespace only)")
    return texts


def load_documents(paths: list[Path], fmt: str = "auto", text_field: str = "text") -> tuple[list[str], int]:
    """Return (non-empty documents in input order, number of empty ones skipped)."""
    check_inputs_exist(paths)
    documents, skipped = [], 0
    for path in paths:
        for text in documents_of(path, fmt, text_field):
            if text.strip():
                documents.append(text)
            else:
                skipped += 1
    return documents, skipped


def shuffled_order(num_docs: int, seed: int) -> list[int]:
    """A seeded permutation of range(num_docs) that no library version can change."""
    return sorted(range(num_docs), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def split_documents(documents: list[str], val_docs: int, seed: int) -> tuple[list[str], list[str]]:
    """Return (validation, train): the first ``val_docs`` of the seeded shuffle, then the rest."""
    if not 1 <= val_docs < len(documents):
        raise DataError(
            f"--val-docs must be between 1 and {len(documents) - 1} for {len(documents)} documents"
        )
    order = shuffled_order(len(documents), seed)
    return [documents[i] for i in order[:val_docs]], [documents[i] for i in order[val_docs:]]


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    train_docs: list[str],
    vocab_size: int,
    out_dir: Path,
    name: str = "tokenizer",
    text_source: str = "the text",
) -> Path:
    """Train the challenge-spec tokenizer on ``train_docs``; write ``name``.model/.vocab."""
    longest_doc_bytes = max(len(doc.encode("utf-8")) for doc in train_docs)
    model = io.BytesIO()
    try:
        # One "sentence" per document so no document is dropped for length; a single thread and a
        # model_writer (no model_prefix path recorded in the model) keep the output byte-identical.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(train_docs),
            model_writer=model,
            vocab_size=vocab_size,
            max_sentence_length=max(SP_DEFAULT_MAX_SENTENCE_BYTES, longest_doc_bytes),
            num_threads=1,
            minloglevel=2,  # errors only: its warnings would break the one-line error promise
            **TOKENIZER_SPEC,
        )
    except RuntimeError as exc:
        raise tokenizer_training_error(exc, vocab_size, text_source) from exc
    model_path = out_dir / f"{name}.model"
    model_path.write_bytes(model.getvalue())
    write_vocab_file(load_tokenizer(model_path, vocab_size), out_dir / f"{name}.vocab")
    return model_path


def tokenizer_training_error(exc: RuntimeError, vocab_size: int, text_source: str) -> DataError:
    """One line from SentencePiece's multi-part message; the common case gets its limit named."""
    limit = re.search(r"Vocabulary size too high .*?<= (\d+)", str(exc))
    if limit:
        return DataError(
            f"{text_source}: --vocab-size {vocab_size} is too large for this training text "
            f"(SentencePiece can make at most {limit.group(1)} pieces from it)"
        )
    detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return DataError(f"{text_source}: tokenizer training failed ({detail})")


def write_vocab_file(sp: spm.SentencePieceProcessor, path: Path) -> None:
    """Write the same "piece<TAB>score" listing SentencePiece writes next to a model."""
    lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    path.write_text("".join(lines), encoding="utf-8")


def load_tokenizer(path: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load a SentencePiece model and check it matches the requested vocab and BOS id."""
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise DataError(f"{path}: not a SentencePiece model ({exc})") from exc
    if sp.vocab_size() != vocab_size:
        raise DataError(
            f"{path}: tokenizer vocab size is {sp.vocab_size()}, but --vocab-size is {vocab_size}"
        )
    if sp.bos_id() != BOS_ID:
        raise DataError(f"{path}: tokenizer bos id is {sp.bos_id()}, the shard format needs {BOS_ID}")
    return sp


def adopt_tokenizer(model_path: Path, vocab_size: int, out_dir: Path) -> Path:
    """Check a given tokenizer and copy it (with its .vocab, if any) into ``out_dir``."""
    load_tokenizer(model_path, vocab_size)
    for source in (model_path, model_path.with_suffix(".vocab")):
        target = out_dir / source.name
        if source.is_file() and not (target.exists() and target.samefile(source)):
            shutil.copyfile(source, target)
    return out_dir / model_path.name


# ---------------------------------------------------------------------------- encoding


class Progress:
    """Throttled progress lines on stderr."""

    def __init__(self, label: str, total_docs: int):
        self.label, self.total_docs = label, total_docs
        self.start = self.last_report = time.monotonic()

    def update(self, docs_done: int, tokens_written: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < PROGRESS_INTERVAL_S:
            return
        self.last_report = now
        rate = docs_done / max(now - self.start, 1e-9)
        print(
            f"[{self.label}] {docs_done}/{self.total_docs} docs ({rate:,.0f} docs/s), "
            f"{tokens_written:,} tokens written",
            file=sys.stderr,
        )


def write_split(
    sp: spm.SentencePieceProcessor, docs: list[str], out_dir: Path, split: str, shard_tokens: int
) -> dict:
    """Encode ``docs`` as BOS + tokens each, write the split's shards, return its manifest entry."""
    writer = ShardWriter(out_dir, split, shard_tokens)
    progress = Progress(split, len(docs))
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        batch = docs[start : start + ENCODE_BATCH_DOCS]
        for ids in sp.encode(batch, out_type=int, num_threads=os.cpu_count() or 1):
            writer.add(np.asarray([BOS_ID, *ids], dtype=np.uint16))
        progress.update(start + len(batch), writer.tokens_written)
    shards = writer.close()
    progress.update(len(docs), writer.tokens_written, force=True)
    return {
        "docs": len(docs),
        "tokens": sum(s["tokens"] for s in shards),
        "text_bytes": sum(len(doc.encode("utf-8")) for doc in docs),
        "shards": shards,
    }


# ---------------------------------------------------------------------------- build


def existing_shards(out_dir: Path) -> list[Path]:
    return sorted(
        p for p in out_dir.glob("fineweb_*.bin") if re.fullmatch(r"fineweb_(train|val)_\d{6}\.bin", p.name)
    )


def planned_outputs(tokenizer: Path | None) -> list[str]:
    """Names of the non-shard files a build writes into the output directory."""
    model_name = "tokenizer.model" if tokenizer is None else tokenizer.name
    return [model_name, str(Path(model_name).with_suffix(".vocab")), "manifest.json"]


def refuse_to_replace(out_dir: Path, tokenizer: Path | None, overwrite: bool) -> None:
    """Nothing already in ``out_dir`` is replaced unless --overwrite says so."""
    if overwrite or not out_dir.exists():
        return
    taken = [p.name for p in existing_shards(out_dir)]
    for name in planned_outputs(tokenizer):
        target = out_dir / name
        is_the_given_tokenizer = tokenizer is not None and target.exists() and target.samefile(tokenizer)
        if target.exists() and not is_the_given_tokenizer:
            taken.append(name)
    if taken:
        more = ", ..." if len(taken) > 1 else ""
        raise DataError(f"{out_dir} already holds {taken[0]}{more}; pass --overwrite to replace them")


class StagedOutput:
    """A hidden staging folder inside ``out_dir``: files move into place only when the build succeeds.

    On any failure (interrupts included) the staging folder goes, and so does every folder this
    run created, when empty; files that were there before are never touched.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.created_dirs = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # deepest first

    def __enter__(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=".build_shards-", dir=self.out_dir))
        return self.staging

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is None:
            self._commit()
            return False
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self.created_dirs:
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone): someone else's files, keep it
                break
        return False

    def _commit(self) -> None:
        # --overwrite: shards of an earlier build that this one does not replace would mix two corpora.
        for stale in existing_shards(self.out_dir):
            stale.unlink()
        for staged in self.staging.iterdir():
            os.replace(staged, self.out_dir / staged.name)
        self.staging.rmdir()


def build(
    inputs: list[Path],
    out_dir: Path,
    *,
    val_docs: int,
    vocab_size: int = 1024,
    tokenizer: Path | None = None,
    seed: int = 1337,
    shard_tokens: int = 100_000_000,
    fmt: str = "auto",
    text_field: str = "text",
    overwrite: bool = False,
) -> dict:
    """Run the whole pipeline; return the manifest (also written to ``out_dir/manifest.json``)."""
    if not 1 <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(
            f"--vocab-size must be between 1 and {MAX_VOCAB_SIZE} (token ids are stored as uint16)"
        )
    if shard_tokens < 1:
        raise DataError("--shard-tokens must be positive")
    refuse_to_replace(out_dir, tokenizer, overwrite)
    documents, skipped = load_documents(inputs, fmt, text_field)
    val, train = split_documents(documents, val_docs, seed)
    with StagedOutput(out_dir) as staging:
        if tokenizer is None:
            text_source = ", ".join(str(p) for p in inputs)
            model_path = train_tokenizer(train, vocab_size, staging, text_source=text_source)
        else:
            model_path = adopt_tokenizer(tokenizer, vocab_size, staging)
        sp = load_tokenizer(model_path, vocab_size)
        manifest = {
            "format": MANIFEST_FORMAT,
            "tokenizer": model_path.name,
            # the trainer compares it with TOKENIZER_PATH: other pieces give the same ids a wrong byte count
            "tokenizer_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
            "tokenizer_trained_here": tokenizer is None,
            "vocab_size": vocab_size,
            "seed": seed,
            "shuffle": "documents ordered by sha256(f'{seed}:{input_index}'); first val_docs are validation",
            "inputs": [p.name for p in inputs],
            "skipped_empty_docs": skipped,
            "splits": {
                "val": write_split(sp, val, staging, "val", shard_tokens),
                "train": write_split(sp, train, staging, "train", shard_tokens),
            },
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="JSON-lines or plain-text files (.xz/.gz accepted)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--val-docs", type=int, required=True, help="documents in the validation split")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument(
        "--tokenizer", type=Path, help="reuse this SentencePiece .model instead of training one"
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed of the document shuffle")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="max tokens per shard")
    parser.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto", dest="fmt")
    parser.add_argument("--text-field", default="text", help="JSON field holding the document text")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace shards, tokenizer and manifest already in --out"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        manifest = build(
            args.inputs,
            args.out,
            val_docs=args.val_docs,
            vocab_size=args.vocab_size,
            tokenizer=args.tokenizer,
            seed=args.seed,
            shard_tokens=args.shard_tokens,
            fmt=args.fmt,
            text_field=args.text_field,
            overwrite=args.overwrite,
        )
    except (DataError, OSError) as exc:  # OSError: disk full, permissions; its text names the path
        sys.exit(f"error: {exc}")
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['docs']} docs, {entry['tokens']:,} tokens, {len(entry['shards'])} shard(s)")


if __name__ == "__main__":
    main()
