#!/usr/bin/env python3
"""Download a published FineWeb export of the challenge from a Hugging Face dataset repository.

Which repository
    ``--repo-id`` wins, then the environment variable ``MATCHED_FINEWEB_REPO_ID`` (the name the
    challenge's own script and the records' READMEs use), then the default: the official
    ``willdepueoai/parameter-golf`` for sp1024. The sp4096/sp8192 exports that the April-2026
    records train on are published in another dataset repository (the records use
    ``kevclark/parameter-golf``); for those variants a repository must be named, so that nothing
    is fetched from a third party without being asked for.

Remote layout (the same in both repositories), under ``--remote-root`` (default ``datasets``,
env ``MATCHED_FINEWEB_REMOTE_ROOT_PREFIX``):
    manifest.json, datasets/fineweb10B_<variant>/fineweb_{train,val}_NNNNNN.bin and
    tokenizers/<tokenizer files>. Shard counts and tokenizer file names come from the manifest
    where it has them, with the known layout (1 val shard, fineweb_<N>_bpe.model/.vocab) as
    fallback.

Local layout under ``--out`` (default: this script's directory, i.e. ``data/``):
    datasets/manifest.json (+ manifest.source.json: the repository and root it came from)
    datasets/fineweb10B_sp8192/fineweb_train_000000.bin ... fineweb_val_000000.bin
    datasets/fineweb10B_sp8192/manifest.json (the export's tokenizer and its sha256, which the trainer
        checks TOKENIZER_PATH against)
    tokenizers/fineweb_8192_bpe.model, tokenizers/fineweb_8192_bpe.vocab

Files already present are skipped: shards when their header matches their size, other files
when non-empty (the manifest only when it parses and came from the same repository and root).
A local manifest from another repository is fetched again; with ``--skip-manifest`` it is
refused instead. Downloads go to a staging folder first and are moved into place when complete.

Examples
    python data/cached_challenge_fineweb.py --variant sp1024 --train-shards 80
    MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python data/cached_challenge_fineweb.py --variant sp8192
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import DataError, shard_token_count  # noqa: E402  (one definition of the shard format)

OFFICIAL_REPO_ID = "willdepueoai/parameter-golf"
COMMUNITY_REPO_ID = "kevclark/parameter-golf"  # where the records' sp4096/sp8192 exports live
COMMUNITY_VARIANTS = ("sp4096", "sp8192")  # not in the official export
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
REMOTE_ROOT_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
STAGING_DIR_NAME = ".hf_staging"
WRITTEN_BY = "data/cached_challenge_fineweb.py"


class DownloadError(RuntimeError):
    """The repository, the manifest or the request cannot give the files asked for."""


@dataclass(frozen=True)
class Source:
    """Where files come from: a dataset repository and the folder of the export inside it."""

    repo_id: str
    remote_root: str

    def as_record(self) -> dict:
        return {"repo_id": self.repo_id, "remote_root": self.remote_root}


@dataclass(frozen=True)
class RemoteFile:
    subfolder: str  # folder inside the Hugging Face repo
    filename: str
    local_path: Path


@dataclass(frozen=True)
class VariantPlan:
    dataset_dir: str
    train_shards_available: int | None  # None: no manifest says
    val_shards: int
    tokenizer_paths: list[str]  # relative to the remote root, e.g. "tokenizers/x.model"


def resolve_source(variant: str, repo_flag: str | None, root_flag: str | None, environ=os.environ) -> Source:
    """The flag wins over the environment variable, which wins over the per-variant default."""
    if not re.fullmatch(r"[a-z]+[0-9]+", variant):
        raise DownloadError(f"--variant {variant!r} is not a variant name such as sp1024, sp4096 or sp8192")
    repo_id = repo_flag or environ.get(REPO_ENV) or None
    if repo_id is None and variant in COMMUNITY_VARIANTS:
        raise DownloadError(
            f"{variant} is not in the official export {OFFICIAL_REPO_ID}; the {'/'.join(COMMUNITY_VARIANTS)} "
            f"exports live in another dataset repository: pass --repo-id {COMMUNITY_REPO_ID} "
            f"or set {REPO_ENV}={COMMUNITY_REPO_ID}"
        )
    remote_root = (root_flag or environ.get(REMOTE_ROOT_ENV) or DEFAULT_REMOTE_ROOT).strip("/")
    return Source(repo_id or OFFICIAL_REPO_ID, remote_root)


# ---------------------------------------------------------------------------- manifest


def default_tokenizer_paths(variant: str) -> list[str]:
    """The export's naming: sp8192 -> tokenizers/fineweb_8192_bpe.{model,vocab}."""
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


def plan_without_manifest(variant: str) -> VariantPlan:
    """The known layout, for --skip-manifest with no local manifest."""
    return VariantPlan(f"fineweb10B_{variant}", None, 1, default_tokenizer_paths(variant))


def plan_variant(manifest: object, variant: str, source: Source) -> VariantPlan:
    """Read what the manifest says about ``variant``; fail clearly when it is not there."""
    dataset_dir = f"fineweb10B_{variant}"
    where = f"{source.remote_root}/manifest.json of {source.repo_id}"
    if not isinstance(manifest, dict):
        raise DownloadError(f"{where} is not a JSON object")
    entry = find_named_entry(manifest.get("datasets"), dataset_dir)
    if entry is None:
        hint = f" (set --repo-id or {REPO_ENV})" if source.repo_id == OFFICIAL_REPO_ID else ""
        raise DownloadError(f"variant {variant!r} (dataset {dataset_dir}) is not in {where}{hint}")
    val_shards = first_int(entry, "files_val", "val_shards", "num_val_shards")
    return VariantPlan(
        dataset_dir=dataset_dir,
        train_shards_available=first_int(entry, "files_train", "train_shards", "num_train_shards"),
        val_shards=1 if val_shards is None else val_shards,
        tokenizer_paths=tokenizer_paths_from_manifest(manifest, entry, variant),
    )


def files_to_fetch(plan: VariantPlan, train_shards: int, out_dir: Path, source: Source) -> list[RemoteFile]:
    """Val shards, the first ``train_shards`` train shards, then the tokenizer files."""
    if train_shards < 0:
        raise DownloadError("--train-shards must be >= 0")
    available = plan.train_shards_available
    if available is not None and train_shards > available:
        raise DownloadError(
            f"{plan.dataset_dir} has {available} train shards in {source.remote_root}/manifest.json of "
            f"{source.repo_id}; {train_shards} requested"
        )
    shard_subfolder = f"{source.remote_root}/datasets/{plan.dataset_dir}"
    shard_dir = out_dir / "datasets" / plan.dataset_dir
    names = [f"fineweb_val_{i:06d}.bin" for i in range(plan.val_shards)]
    names += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files = [RemoteFile(shard_subfolder, name, shard_dir / name) for name in names]
    for path in plan.tokenizer_paths:
        folder, _, name = f"{source.remote_root}/{path}".rpartition("/")
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


def download(remote: RemoteFile, staging_dir: Path, source: Source) -> None:
    """Fetch one file through the hub into ``staging_dir``, then move it into place."""
    try:  # imported here: importing this module stays offline and works without the hub
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DownloadError("huggingface_hub is not installed (pip install huggingface_hub)") from exc
    try:
        fetched = hf_hub_download(
            repo_id=source.repo_id,
            filename=remote.filename,
            subfolder=remote.subfolder,
            repo_type="dataset",
            local_dir=staging_dir,
        )
    except Exception as exc:  # the hub raises many types (HTTP, missing entry, offline): one line for all
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DownloadError(
            f"{source.repo_id}: cannot download {remote.subfolder}/{remote.filename} "
            f"({type(exc).__name__}: {first_line})"
        ) from exc
    remote.local_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(fetched, remote.local_path)


class Fetcher:
    """Downloads files that are missing or incomplete and keeps a record of what it did."""

    def __init__(self, out_dir: Path, source: Source):
        self.source = source
        self.staging_dir = out_dir / STAGING_DIR_NAME
        self.downloaded: list[Path] = []
        self.skipped: list[Path] = []

    def fetch(self, remote: RemoteFile, force: bool = False) -> None:
        if not force and is_complete(remote.local_path):
            self.skipped.append(remote.local_path)
            print(f"skip {remote.local_path} (present)", file=sys.stderr)
            return
        remote_name = f"{self.source.repo_id}:{remote.subfolder}/{remote.filename}"
        print(f"download {remote_name} -> {remote.local_path}", file=sys.stderr)
        download(remote, self.staging_dir, self.source)
        if not is_complete(remote.local_path):
            raise DownloadError(
                f"{remote.local_path}: downloaded file is empty or its size does not match its header"
            )
        self.downloaded.append(remote.local_path)

    def clean_up(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)


# ---------------------------------------------------------------------------- manifest provenance


def manifest_paths(out_dir: Path) -> tuple[Path, Path]:
    """The local manifest and the record of which repository and root it came from."""
    folder = out_dir / "datasets"
    return folder / "manifest.json", folder / "manifest.source.json"


def recorded_source(record_path: Path) -> dict | None:
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def load_manifest(fetcher: Fetcher, out_dir: Path, skip_manifest: bool) -> object | None:
    """The manifest of ``fetcher.source``; never one that came from elsewhere.

    A local manifest is reused only when its source record names the same repository and root.
    Otherwise it is fetched again, or, with ``skip_manifest``, refused. ``skip_manifest`` with no
    local manifest returns None (the caller falls back to the known layout).
    """
    manifest_path, record_path = manifest_paths(out_dir)
    source = fetcher.source
    present = is_complete(manifest_path)
    same_source = present and recorded_source(record_path) == source.as_record()
    if skip_manifest and not present:
        return None
    if skip_manifest and not same_source:
        origin = recorded_source(record_path) or {"repo_id": "an unrecorded repository"}
        raise DownloadError(
            f"{manifest_path} came from {origin.get('repo_id')}, not {source.repo_id} "
            f"(root {source.remote_root}); rerun without --skip-manifest to fetch the right one, or delete it"
        )
    if not skip_manifest:
        if present and not same_source:
            note = f"{manifest_path} is not from {source.repo_id}/{source.remote_root}: fetching it again"
            print(note, file=sys.stderr)
        fetcher.fetch(RemoteFile(source.remote_root, "manifest.json", manifest_path), force=not same_source)
        record_path.write_text(json.dumps(source.as_record()) + "\n", encoding="utf-8")
    return json.loads(manifest_path.read_text(encoding="utf-8"))


def fetch_variant(
    variant: str, train_shards: int, out_dir: Path, source: Source | None = None, skip_manifest: bool = False
) -> Fetcher:
    """Fetch (or reuse) the manifest, then the variant's val shards, train shards and tokenizer."""
    source = source or resolve_source(variant, None, None)
    fetcher = Fetcher(out_dir, source)
    try:
        manifest = load_manifest(fetcher, out_dir, skip_manifest)
        if manifest is None:
            note = "no usable local manifest (--skip-manifest): assuming 1 val shard and the standard names"
            print(note, file=sys.stderr)
            plan = plan_without_manifest(variant)
        else:
            plan = plan_variant(manifest, variant, source)
        for remote in files_to_fetch(plan, train_shards, out_dir, source):
            fetcher.fetch(remote)
        record_tokenizer(out_dir, plan, source)
    finally:
        fetcher.clean_up()
    return fetcher


def record_tokenizer(out_dir: Path, plan: VariantPlan, source: Source) -> None:
    """Writes the shard folder's manifest.json naming the export's tokenizer and its sha256: the trainer
    checks TOKENIZER_PATH against it (another tokenizer of the same size gives a silently wrong score)."""
    models = [p for p in plan.tokenizer_paths if p.endswith(".model")]
    manifest_path = out_dir / "datasets" / plan.dataset_dir / "manifest.json"
    if not models:
        return
    model = out_dir / "tokenizers" / models[0].rpartition("/")[2]
    if manifest_path.exists():
        try:
            ours = json.loads(manifest_path.read_text(encoding="utf-8")).get("written_by") == WRITTEN_BY
        except (ValueError, AttributeError):
            ours = False
        if not ours:  # never replace a file this script did not write
            print(f"{manifest_path} exists and was not written here: tokenizer not recorded", file=sys.stderr)
            return
    record = {
        "written_by": WRITTEN_BY,
        "source": source.as_record(),
        "tokenizer": model.name,
        "tokenizer_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
    }
    manifest_path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="sp1024", help="tokenizer variant: sp1024, sp4096 or sp8192")
    parser.add_argument(
        "--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="train shards to fetch"
    )
    parser.add_argument("--repo-id", help=f"dataset repository (wins over ${REPO_ENV})")
    parser.add_argument(
        "--remote-root", help=f"folder of the export in the repository (wins over ${REMOTE_ROOT_ENV})"
    )
    parser.add_argument("--skip-manifest", action="store_true", help="do not download the manifest")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent, help="root of the local layout"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        source = resolve_source(args.variant, args.repo_id, args.remote_root)
        fetcher = fetch_variant(args.variant, args.train_shards, args.out, source, args.skip_manifest)
    except (DownloadError, OSError) as exc:  # OSError: disk full, permissions; its text names the path
        sys.exit(f"error: {exc}")
    print(f"downloaded {len(fetcher.downloaded)} file(s), skipped {len(fetcher.skipped)} already present")


if __name__ == "__main__":
    main()
