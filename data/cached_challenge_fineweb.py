#!/usr/bin/env python3
"""Download the challenge's published FineWeb export from Hugging Face.

Source: dataset repo ``willdepueoai/parameter-golf``, files under ``datasets/``:
``manifest.json``, ``datasets/<dataset_dir>/fineweb_{train,val}_NNNNNN.bin`` and
``tokenizers/<tokenizer files>``. The manifest is fetched first; shard counts and tokenizer
file names are taken from it where it has them, with the known layout as fallback.

Local layout under ``--out`` (default: this script's directory, i.e. ``data/``):
    datasets/manifest.json
    datasets/fineweb10B_sp1024/fineweb_train_000000.bin ...  fineweb_val_000000.bin
    tokenizers/fineweb_1024_bpe.model, tokenizers/fineweb_1024_bpe.vocab

Files already present are skipped: shards when their header matches their size, other files
when non-empty (the manifest also when it parses). Downloads go to a staging folder first
and are moved into place only when complete.

Example
    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import DataError, shard_token_count  # noqa: E402  (one definition of the shard format)

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
STAGING_DIR_NAME = ".hf_staging"


class DownloadError(RuntimeError):
    """The manifest or the request cannot give the files asked for."""


@dataclass(frozen=True)
class RemoteFile:
    subfolder: str  # folder inside the Hugging Face repo
    filename: str
    local_path: Path


@dataclass(frozen=True)
class VariantPlan:
    dataset_dir: str
    train_shards_available: int | None  # None: the manifest does not say
    val_shards: int
    tokenizer_paths: list[str]  # relative to REMOTE_ROOT, e.g. "tokenizers/x.model"


# ---------------------------------------------------------------------------- manifest


def default_tokenizer_paths(variant: str) -> list[str]:
    """The export's naming: sp1024 -> tokenizers/fineweb_1024_bpe.{model,vocab}."""
    size = variant.removeprefix("sp")
    return [f"tokenizers/fineweb_{size}_bpe.model", f"tokenizers/fineweb_{size}_bpe.vocab"]


def find_named_entry(collection: object, name: str) -> dict | None:
    """Find ``name`` in a list of {"name": ...} dicts or a dict keyed by name."""
    if isinstance(collection, dict):
        entry = collection.get(name)
        return entry if isinstance(entry, dict) else None
    if isinstance(collection, list):
        return next((e for e in collection if isinstance(e, dict) and e.get("name") == name), None)
    return None


def first_int(entry: dict, *keys: str) -> int | None:
    """The first of ``keys`` found as an integer in ``entry`` or its "stats" sub-dict."""
    stats = entry.get("stats") if isinstance(entry.get("stats"), dict) else {}
    for source in (stats, entry):
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def tokenizer_paths_from_manifest(manifest: dict, dataset_entry: dict, variant: str) -> list[str]:
    tokenizer_entry = find_named_entry(manifest.get("tokenizers"), dataset_entry.get("tokenizer_name", ""))
    if tokenizer_entry is None:
        return default_tokenizer_paths(variant)
    keys = ("model_path", "vocab_path", "path")
    paths = [tokenizer_entry[k] for k in keys if isinstance(tokenizer_entry.get(k), str)]
    return paths or default_tokenizer_paths(variant)


def plan_variant(manifest: object, variant: str) -> VariantPlan:
    """Read what the manifest says about ``variant``; fail clearly when it is not there."""
    dataset_dir = f"fineweb10B_{variant}"
    if not isinstance(manifest, dict):
        raise DownloadError(f"{REMOTE_ROOT}/manifest.json is not a JSON object")
    entry = find_named_entry(manifest.get("datasets"), dataset_dir)
    if entry is None:
        raise DownloadError(f"variant {variant!r} (dataset {dataset_dir}) is not in {REMOTE_ROOT}/manifest.json")
    val_shards = first_int(entry, "files_val", "val_shards", "num_val_shards")
    return VariantPlan(
        dataset_dir=dataset_dir,
        train_shards_available=first_int(entry, "files_train", "train_shards", "num_train_shards"),
        val_shards=1 if val_shards is None else val_shards,
        tokenizer_paths=tokenizer_paths_from_manifest(manifest, entry, variant),
    )


def files_to_fetch(plan: VariantPlan, train_shards: int, out_dir: Path) -> list[RemoteFile]:
    """Val shards, the first ``train_shards`` train shards, then the tokenizer files."""
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0")
    available = plan.train_shards_available
    if available is not None and train_shards > available:
        raise DownloadError(
            f"{plan.dataset_dir} has {available} train shards in {REMOTE_ROOT}/manifest.json; {train_shards} requested"
        )
    shard_subfolder = f"{REMOTE_ROOT}/datasets/{plan.dataset_dir}"
    shard_dir = out_dir / "datasets" / plan.dataset_dir
    names = [f"fineweb_val_{i:06d}.bin" for i in range(plan.val_shards)]
    names += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files = [RemoteFile(shard_subfolder, name, shard_dir / name) for name in names]
    for path in plan.tokenizer_paths:
        folder, _, name = f"{REMOTE_ROOT}/{path}".rpartition("/")
        files.append(RemoteFile(folder, name, out_dir / "tokenizers" / name))
    return files


# ---------------------------------------------------------------------------- files


def is_complete(path: Path) -> bool:
    """Whether a local file looks fully downloaded (shards: header agrees with file size)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if path.suffix == ".bin":
        try:
            shard_token_count(str(path))
        except DataError:
            return False
        return True
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    return True


def download(remote: RemoteFile, staging_dir: Path) -> None:
    """Fetch one file through the hub into ``staging_dir``, then move it into place."""
    from huggingface_hub import hf_hub_download  # imported here: importing this module stays offline

    fetched = hf_hub_download(
        repo_id=REPO_ID,
        filename=remote.filename,
        subfolder=remote.subfolder,
        repo_type="dataset",
        local_dir=staging_dir,
    )
    remote.local_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, remote.local_path)


class Fetcher:
    """Downloads files that are missing or incomplete and keeps a record of what it did."""

    def __init__(self, out_dir: Path):
        self.staging_dir = out_dir / STAGING_DIR_NAME
        self.downloaded: list[Path] = []
        self.skipped: list[Path] = []

    def fetch(self, remote: RemoteFile) -> None:
        if is_complete(remote.local_path):
            self.skipped.append(remote.local_path)
            print(f"skip {remote.local_path} (present)", file=sys.stderr)
            return
        print(f"download {remote.subfolder}/{remote.filename} -> {remote.local_path}", file=sys.stderr)
        download(remote, self.staging_dir)
        if not is_complete(remote.local_path):
            raise DownloadError(f"{remote.local_path}: downloaded file is empty or its size does not match its header")
        self.downloaded.append(remote.local_path)

    def clean_up(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


def load_manifest(fetcher: Fetcher, out_dir: Path) -> object:
    manifest_file = RemoteFile(REMOTE_ROOT, "manifest.json", out_dir / "datasets" / "manifest.json")
    fetcher.fetch(manifest_file)
    return json.loads(manifest_file.local_path.read_text(encoding="utf-8"))


def fetch_variant(variant: str, train_shards: int, out_dir: Path) -> Fetcher:
    """Fetch the manifest, then the variant's val shards, train shards and tokenizer."""
    fetcher = Fetcher(out_dir)
    try:
        plan = plan_variant(load_manifest(fetcher, out_dir), variant)
        for remote in files_to_fetch(plan, train_shards, out_dir):
            fetcher.fetch(remote)
    finally:
        fetcher.clean_up()
    return fetcher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sp1024", help="tokenizer variant, e.g. sp1024")
    parser.add_argument("--train-shards", type=int, default=80, help="number of train shards to fetch")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="root of the local layout")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        fetcher = fetch_variant(args.variant, args.train_shards, args.out)
    except DownloadError as exc:
        sys.exit(f"error: {exc}")
    print(f"downloaded {len(fetcher.downloaded)} file(s), skipped {len(fetcher.skipped)} already present")


if __name__ == "__main__":
    main()
