"""Tests for data/build_shards.py, data/cached_challenge_fineweb.py and the shipped data/sample."""

import os

os.environ["HF_HUB_OFFLINE"] = (
    "1"  # set before anything imports huggingface_hub: no test may reach the network
)

import gzip
import hashlib
import json
import lzma
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt as tg
from data import build_shards as bs
from data import cached_challenge_fineweb as ccf

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"
SAMPLE_DIR = DATA_DIR / "sample"
SAMPLE_SOURCE = Path("/work/shared/data/sample_docs.jsonl.xz")

VOCAB = 320
VAL_DOCS = 6
SEED = 7
SHARD_TOKENS = 2000


# ---------------------------------------------------------------------------- helpers


def split_at_bos(tokens: np.ndarray) -> list[np.ndarray]:
    """Per-document token arrays (BOS removed); asserts the stream starts with BOS."""
    assert tokens[0] == bs.BOS_ID
    starts = np.flatnonzero(tokens == bs.BOS_ID)
    return [tokens[s + 1 : e] for s, e in zip(starts, list(starts[1:]) + [len(tokens)])]


def read_split(out_dir: Path, manifest: dict, split: str) -> np.ndarray:
    return np.concatenate([bs.read_shard(out_dir / s["file"]) for s in manifest["splits"][split]["shards"]])


def normalized(sp: spm.SentencePieceProcessor, text: str) -> str:
    return sp.normalize(text).replace("\u2581", " ")


def synthetic_documents(count: int = 48) -> list[str]:
    """Unique short documents with digits, line breaks and NFKC-sensitive characters."""
    rng = random.Random(0)
    words = "the river stone light garden winter paper signal market window forest engine".split()
    docs = []
    for i in range(count):
        lines = [
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) for _ in range(rng.randint(1, 3))
        ]
        # "1999" recurs so that, without split_digits, BPE would merge its digits.
        docs.append(f"Document {i} of 1999: " + "\n".join(lines) + f" ﬁnal {rng.randint(0, 99999)} café ①.")
    return docs


def assert_same_shards(dir_a: Path, dir_b: Path) -> None:
    names = sorted(p.name for p in bs.existing_shards(dir_a))
    assert names == sorted(p.name for p in bs.existing_shards(dir_b))
    for name in names:
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes(), name


# ---------------------------------------------------------------------------- shard format


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 40000], dtype=np.int64)
    path = tmp_path / "x.bin"
    bs.write_shard(path, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, len(tokens)] and not header[3:].any()
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    read = bs.read_shard(path)
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()


def test_empty_shard_round_trip(tmp_path):
    bs.write_shard(tmp_path / "e.bin", [])
    assert bs.read_shard(tmp_path / "e.bin").size == 0


def test_write_shard_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(bs.DataError, match="uint16"):
        bs.write_shard(tmp_path / "x.bin", [1, 65536])


def test_shard_writer_splits_documents_across_shards(tmp_path):
    writer = bs.ShardWriter(tmp_path, "train", shard_tokens=4)
    for doc in ([1, 10, 11], [1, 12, 13, 14], [1, 15]):
        writer.add(np.array(doc, dtype=np.uint16))
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [4, 4, 1]
    assert [s["file"] for s in shards] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    stream = np.concatenate([bs.read_shard(tmp_path / s["file"]) for s in shards])
    assert stream.tolist() == [1, 10, 11, 1, 12, 13, 14, 1, 15]


# ---------------------------------------------------------------------------- inputs and split


def test_shuffled_order_is_a_seeded_permutation():
    order = bs.shuffled_order(100, SEED)
    assert sorted(order) == list(range(100))
    assert order != list(range(100))
    assert order == bs.shuffled_order(100, SEED)
    assert order != bs.shuffled_order(100, SEED + 1)


def test_text_input_is_blank_line_separated_blocks(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\nsecond line\n\n\n  \nnext doc\n\nlast", encoding="utf-8")
    docs, skipped = bs.load_documents([path])
    assert docs == ["first line\nsecond line", "next doc", "last"] and skipped == 0


def test_jsonl_input_custom_field_and_empty_docs(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for body in ["a b", "  ", "c"]:
            f.write(json.dumps({"body": body}) + "\n")
    assert bs.load_documents([path], text_field="body") == (["a b", "c"], 1)
    with pytest.raises(bs.DataError, match=r"docs.jsonl.gz:1: no string field 'text'"):
        bs.load_documents([path])


def test_val_docs_must_leave_training_documents():
    with pytest.raises(bs.DataError, match="--val-docs"):
        bs.split_documents(["a", "b"], val_docs=2, seed=SEED)


# ---------------------------------------------------------------------------- build on a synthetic corpus


@pytest.fixture(scope="module")
def docs():
    return synthetic_documents()


@pytest.fixture(scope="module")
def jsonl_build(tmp_path_factory, docs):
    """A build through the CLI from an .xz JSON-lines file; returns (out_dir, manifest)."""
    root = tmp_path_factory.mktemp("jsonl_build")
    source = root / "docs.jsonl.xz"
    with lzma.open(source, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    out = root / "out"
    bs.main([str(source), "--out", str(out), "--val-docs", str(VAL_DOCS), "--vocab-size", str(VOCAB),
             "--seed", str(SEED), "--shard-tokens", str(SHARD_TOKENS)])  # fmt: skip
    return out, json.loads((out / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(jsonl_build):
    return spm.SentencePieceProcessor(model_file=str(jsonl_build[0] / "tokenizer.model"))


def test_tokenizer_follows_the_challenge_spec(tokenizer):
    sp = tokenizer
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(sp.is_byte(i) for i in range(4, 260)) and sp.id_to_piece(4 + 0x41) == "<0x41>"
    assert {sp.id_to_piece(i) for i in sp.encode("\u6f22")} == {"<0xE6>", "<0xBC>", "<0xA2>"}  # byte fallback
    assert sp.encode("1999", out_type=str) == ["1", "9", "9", "9"]  # split_digits
    assert not sp.encode("river", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert normalized(sp, "\ufb01nal \u2460") == "final 1"  # NFKC


def test_tokenizer_vocab_file_lists_every_piece(jsonl_build, tokenizer):
    lines = (jsonl_build[0] / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(lines) == VOCAB
    assert lines[1] == "<s>\t0" and lines[300].split("\t")[0] == tokenizer.id_to_piece(300)


def test_split_decodes_to_seeded_shuffle_without_leakage(jsonl_build, tokenizer, docs):
    out, manifest = jsonl_build
    order = bs.shuffled_order(len(docs), SEED)
    expected_val = [normalized(tokenizer, docs[i]) for i in order[:VAL_DOCS]]
    expected_train = [normalized(tokenizer, docs[i]) for i in order[VAL_DOCS:]]
    val = [tokenizer.decode(d.tolist()) for d in split_at_bos(read_split(out, manifest, "val"))]
    train = [tokenizer.decode(d.tolist()) for d in split_at_bos(read_split(out, manifest, "train"))]
    assert val == expected_val
    assert train == expected_train
    assert not set(val) & set(train)
    # exact layout: BOS + the document's tokens, nothing else (no EOS)
    expected_val_stream = [t for i in order[:VAL_DOCS] for t in [bs.BOS_ID, *tokenizer.encode(docs[i])]]
    assert read_split(out, manifest, "val").tolist() == expected_val_stream


def test_tokenizer_is_trained_on_training_documents_only(tmp_path, docs):
    marked = list(docs)
    for i in bs.shuffled_order(len(docs), SEED)[:VAL_DOCS]:
        marked[i] += " qjx" * 200  # would surely become a merged piece if validation text were seen
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(marked), encoding="utf-8")
    bs.build([source], tmp_path / "out", val_docs=VAL_DOCS, vocab_size=VOCAB, seed=SEED)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert not [sp.id_to_piece(i) for i in range(VOCAB) if "qj" in sp.id_to_piece(i)]


def test_manifest_matches_shards(jsonl_build, docs):
    out, manifest = jsonl_build
    assert manifest["tokenizer"] == "tokenizer.model" and manifest["vocab_size"] == VOCAB
    assert manifest["seed"] == SEED
    listed = [s["file"] for split in ("val", "train") for s in manifest["splits"][split]["shards"]]
    assert sorted(listed) == sorted(p.name for p in bs.existing_shards(out))
    assert len(manifest["splits"]["train"]["shards"]) >= 2  # the corpus spans shards
    order = bs.shuffled_order(len(docs), SEED)
    split_docs = {"val": [docs[i] for i in order[:VAL_DOCS]], "train": [docs[i] for i in order[VAL_DOCS:]]}
    for split, entry in manifest["splits"].items():
        stream = read_split(out, manifest, split)
        for shard in entry["shards"]:
            assert len(bs.read_shard(out / shard["file"])) == shard["tokens"] <= SHARD_TOKENS
        assert entry["tokens"] == len(stream)
        assert entry["docs"] == int((stream == bs.BOS_ID).sum()) == len(split_docs[split])
        assert entry["text_bytes"] == sum(len(d.encode("utf-8")) for d in split_docs[split])


def test_plain_text_input_with_reused_tokenizer_gives_same_shards(tmp_path, jsonl_build, docs):
    out, _ = jsonl_build
    source = tmp_path / "docs.txt.gz"
    with gzip.open(source, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(docs) + "\n")
    manifest = bs.build([source], tmp_path / "out", val_docs=VAL_DOCS, vocab_size=VOCAB, seed=SEED,
                        shard_tokens=SHARD_TOKENS, tokenizer=out / "tokenizer.model")  # fmt: skip
    assert manifest["tokenizer_trained_here"] is False
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    assert_same_shards(out, tmp_path / "out")


def test_reused_tokenizer_with_wrong_vocab_size_fails_clearly(tmp_path, jsonl_build, docs):
    model = jsonl_build[0] / "tokenizer.model"
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    with pytest.raises(bs.DataError) as info:
        bs.build([source], tmp_path / "out", val_docs=VAL_DOCS, vocab_size=1024, tokenizer=model)
    message = str(info.value)
    assert str(model) in message and f"vocab size is {VOCAB}" in message and "1024" in message


def test_reused_tokenizer_with_other_bos_id_fails_clearly(tmp_path, docs):
    prefix = tmp_path / "odd"
    spec = dict(bs.TOKENIZER_SPEC, bos_id=2, eos_id=1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_prefix=str(prefix), vocab_size=VOCAB,
                                   minloglevel=2, **spec)  # fmt: skip
    with pytest.raises(bs.DataError, match=r"odd\.model: tokenizer bos id is 2"):
        bs.load_tokenizer(Path(f"{prefix}.model"), VOCAB)


def test_vocab_limit_is_the_trainers_rule(tmp_path, jsonl_build):
    # The trainer accepts VOCAB_SIZE <= 65536 (uint16 ids 0..65535): the data tools use the same limit.
    assert bs.MAX_VOCAB_SIZE == 65536
    with pytest.raises(bs.DataError, match="between 1 and 65536.*uint16"):
        bs.build([tmp_path / "unused.txt"], tmp_path / "out", val_docs=1, vocab_size=65537)
    with pytest.raises(bs.DataError, match="input file not found"):  # 65536 itself passes the vocab check
        bs.build([tmp_path / "unused.txt"], tmp_path / "out", val_docs=1, vocab_size=65536)
    bs.write_shard(tmp_path / "top.bin", [65535])
    with pytest.raises(bs.DataError, match=r"0\.\.65535"):
        bs.write_shard(tmp_path / "over.bin", [65536])


def test_refuses_existing_shards_tokenizer_or_manifest_without_overwrite(tmp_path, jsonl_build, docs):
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    with pytest.raises(bs.DataError, match="already holds fineweb_train_000000.bin, ...; pass --overwrite"):
        bs.build([source], jsonl_build[0], val_docs=1)
    own_tokenizer = tmp_path / "keep" / "tokenizer.model"
    own_tokenizer.parent.mkdir()
    own_tokenizer.write_bytes(b"a user's file")
    with pytest.raises(bs.DataError, match="keep already holds tokenizer.model; pass --overwrite"):
        bs.build([source], own_tokenizer.parent, val_docs=VAL_DOCS, vocab_size=VOCAB)
    assert own_tokenizer.read_bytes() == b"a user's file"
    assert sorted(p.name for p in own_tokenizer.parent.iterdir()) == ["tokenizer.model"]


# ---------------------------------------------------------------------------- bad inputs and clean failure


def cli_error(argv: list[str]) -> str:
    """The one-line message ``build_shards.main`` exits with (non-zero: sys.exit with a string)."""
    with pytest.raises(SystemExit) as info:
        bs.main(argv)
    message = info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    return message


def write_bad_input(path: Path, kind: str) -> None:
    if kind == "binary":
        path.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8
    elif kind == "nul":
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # valid UTF-8, but binary
    elif kind == "corrupt_xz":
        path.write_bytes(b"\xfd7zXZ\x00\x00 not really xz")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank":
        path.write_text("  \n\n\t\n", encoding="utf-8")


@pytest.mark.parametrize(
    "kind, name, expected",
    [
        ("missing", "gone.txt", "gone.txt: input file not found"),
        ("binary", "blob.txt", "blob.txt: not readable as UTF-8 text (UnicodeDecodeError): binary input?"),
        (
            "binary",
            "blob.jsonl",
            "blob.jsonl: not readable as UTF-8 jsonl (UnicodeDecodeError): binary input?",
        ),
        ("nul", "archive.txt", "archive.txt:1: NUL byte: binary input, not text"),
        (
            "corrupt_xz",
            "docs.jsonl.xz",
            "docs.jsonl.xz: not readable as UTF-8 jsonl (LZMAError): binary input?",
        ),
        ("empty", "empty.txt", "empty.txt: no documents (the input is empty or whitespace only)"),
        ("blank", "blank.jsonl", "blank.jsonl: no documents (the input is empty or whitespace only)"),
    ],
)
def test_bad_input_gives_one_line_naming_it_and_creates_nothing(tmp_path, docs, kind, name, expected):
    good = tmp_path / "good.txt"
    good.write_text("\n\n".join(docs), encoding="utf-8")
    bad = tmp_path / name
    write_bad_input(bad, kind)
    out = tmp_path / "new" / "out"
    message = cli_error(
        [str(good), str(bad), "--out", str(out), "--val-docs", "2", "--vocab-size", str(VOCAB)]
    )
    assert message == f"error: {bad}{expected.removeprefix(name)}"
    assert not (tmp_path / "new").exists()


def test_vocab_too_large_for_the_text_names_the_input_and_leaves_no_folder(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"a short note {i}" for i in range(10)), encoding="utf-8")
    out = tmp_path / "new" / "deeper" / "out"
    message = cli_error([str(small), "--out", str(out), "--val-docs", "2", "--vocab-size", "1024"])
    assert message.startswith(f"error: {small}: --vocab-size 1024 is too large for this training text")
    assert re.search(r"at most \d+ pieces", message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]  # new/deeper/out all removed


@pytest.mark.slow
def test_cli_failure_exits_nonzero_with_one_stderr_line(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("tiny\n\nnotes\n\nhere", encoding="utf-8")
    command = [sys.executable, str(DATA_DIR / "build_shards.py"), str(small), "--out", str(tmp_path / "out"),
               "--val-docs", "1", "--vocab-size", "4000"]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {small}: --vocab-size 4000 is too large")
    assert not (tmp_path / "out").exists()


def test_failure_midway_keeps_pre_existing_files_and_removes_only_its_own(
    tmp_path, jsonl_build, docs, monkeypatch
):
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    real_write_split = bs.write_split

    def interrupted(sp, split_docs, folder, split, shard_tokens):
        real_write_split(sp, split_docs, folder, split, shard_tokens)  # some shards exist when it stops
        raise KeyboardInterrupt

    monkeypatch.setattr(bs, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bs.build(
            [source], out, val_docs=VAL_DOCS, tokenizer=jsonl_build[0] / "tokenizer.model", vocab_size=VOCAB
        )
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.txt"
    ]  # the staging folder is gone, the user's file kept
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_failed_overwrite_leaves_the_previous_build_intact(tmp_path, jsonl_build):
    out = jsonl_build[0]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"note {i}" for i in range(10)), encoding="utf-8")
    cli_error([str(small), "--out", str(out), "--val-docs", "2", "--vocab-size", "1024", "--overwrite"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_overwrite_replaces_every_shard_of_the_previous_build(tmp_path, jsonl_build, docs):
    source = tmp_path / "docs.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    model = jsonl_build[0] / "tokenizer.model"
    out = tmp_path / "out"
    kwargs = dict(val_docs=VAL_DOCS, vocab_size=VOCAB, seed=SEED, tokenizer=model)
    first = bs.build([source], out, shard_tokens=500, **kwargs)
    assert len(first["splits"]["train"]["shards"]) > 2
    second = bs.build([source], out, shard_tokens=SHARD_TOKENS * 10, overwrite=True, **kwargs)
    assert [s["file"] for s in second["splits"]["train"]["shards"]] == ["fineweb_train_000000.bin"]
    assert [p.name for p in bs.existing_shards(out)] == ["fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- download script


FAKE_MANIFEST = {
    "datasets": [
        {
            "name": "fineweb10B_sp4096",
            "tokenizer_name": "sp_bpe_4096",
            "stats": {"files_train": 9, "files_val": 1},
        },
        {
            "name": "fineweb10B_sp1024",
            "tokenizer_name": "sp_bpe_1024",
            "stats": {"files_train": 5, "files_val": 1},
        },
    ],
    "tokenizers": [
        {
            "name": "sp_bpe_1024",
            "model_path": "tokenizers/fineweb_1024_bpe.model",
            "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
        }
    ],
}


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download: writes plausible files, records calls."""

    def __init__(self, manifest, community_manifest=None):
        self.manifests = {ccf.OFFICIAL_REPO_ID: manifest}
        self.community_manifest = community_manifest or manifest  # served by every other repository
        self.calls = []

    def __call__(self, repo_id, filename, *, subfolder=None, repo_type=None, local_dir=None, **kwargs):
        self.calls.append(
            dict(repo_id=repo_id, filename=filename, subfolder=subfolder, repo_type=repo_type, **kwargs)
        )
        path = Path(local_dir) / (subfolder or "") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if filename == "manifest.json":
            manifest = self.manifests.get(repo_id, self.community_manifest)
            path.write_text(json.dumps(manifest), encoding="utf-8")
        elif filename.endswith(".bin"):
            bs.write_shard(path, np.arange(10))
        else:
            path.write_bytes(b"tokenizer bytes")
        return str(path)

    def requested(self):
        return [(c["subfolder"], c["filename"]) for c in self.calls]


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch):
    """Any test that reaches the real hub function fails instead of touching the network."""
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def refuse(*args, **kwargs):
        raise AssertionError("test tried to use the real huggingface_hub.hf_hub_download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    for name in (ccf.REPO_ENV, ccf.REMOTE_ROOT_ENV):  # the developer's shell must not steer the tests
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub(FAKE_MANIFEST)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


def test_download_requests_exactly_the_needed_files(tmp_path, fake_hub, capsys):
    ccf.main(["--variant", "sp1024", "--train-shards", "2", "--out", str(tmp_path)])
    shard_folder = "datasets/datasets/fineweb10B_sp1024"
    assert fake_hub.requested() == [
        ("datasets", "manifest.json"),
        (shard_folder, "fineweb_val_000000.bin"),
        (shard_folder, "fineweb_train_000000.bin"),
        (shard_folder, "fineweb_train_000001.bin"),
        ("datasets/tokenizers", "fineweb_1024_bpe.model"),
        ("datasets/tokenizers", "fineweb_1024_bpe.vocab"),
    ]
    assert {c["repo_id"] for c in fake_hub.calls} == {"willdepueoai/parameter-golf"}
    assert {c["repo_type"] for c in fake_hub.calls} == {"dataset"}
    local = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert local == [
        "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
        "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
        "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
        "datasets/fineweb10B_sp1024/manifest.json",
        "datasets/manifest.json",
        "datasets/manifest.source.json",
        "tokenizers/fineweb_1024_bpe.model",
        "tokenizers/fineweb_1024_bpe.vocab",
    ]
    record = json.loads((tmp_path / "datasets/manifest.source.json").read_text(encoding="utf-8"))
    assert record == {"repo_id": "willdepueoai/parameter-golf", "remote_root": "datasets"}
    # the shard folder names the export's tokenizer: the trainer checks TOKENIZER_PATH against it
    identity = json.loads((tmp_path / "datasets/fineweb10B_sp1024/manifest.json").read_text(encoding="utf-8"))
    model = tmp_path / "tokenizers/fineweb_1024_bpe.model"
    assert identity["tokenizer"] == model.name
    assert identity["tokenizer_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert tg.check_tokenizer_identity(str(tmp_path / "datasets/fineweb10B_sp1024"), str(model)) is None
    assert "downloaded 6 file(s), skipped 0" in capsys.readouterr().out


def test_download_skips_present_files_and_refetches_broken_ones(tmp_path, fake_hub, capsys):
    args = ["--train-shards", "2", "--out", str(tmp_path)]
    ccf.main(args)
    fake_hub.calls.clear()
    ccf.main(args)
    assert fake_hub.calls == []
    assert "downloaded 0 file(s), skipped 6" in capsys.readouterr().out
    shard = tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    ccf.main(args)
    assert fake_hub.requested() == [("datasets/datasets/fineweb10B_sp1024", "fineweb_train_000001.bin")]
    assert bs.read_shard(shard).size == 10


def test_download_fails_clearly_for_missing_variant_or_too_many_shards(tmp_path, fake_hub):
    with pytest.raises(
        ccf.DownloadError, match=r"'sp2048'.*not in datasets/manifest.json of willdepueoai.*--repo-id"
    ):
        ccf.fetch_variant("sp2048", 1, tmp_path)
    with pytest.raises(ccf.DownloadError, match="has 5 train shards.*6 requested"):
        ccf.fetch_variant("sp1024", 6, tmp_path)
    with pytest.raises(SystemExit, match="error: .*sp2048"):
        ccf.main(["--variant", "sp2048", "--out", str(tmp_path)])
    assert [c["filename"] for c in fake_hub.calls] == ["manifest.json"]  # fetched once, then reused


def test_download_tolerates_sparse_manifest(tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub({"datasets": {"fineweb10B_sp1024": {}}})  # keyed by name, no stats, no tokenizers
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    ccf.fetch_variant("sp1024", 1, tmp_path)
    assert [name for _, name in hub.requested()] == [
        "manifest.json",
        "fineweb_val_000000.bin",
        "fineweb_train_000000.bin",
        "fineweb_1024_bpe.model",
        "fineweb_1024_bpe.vocab",
    ]


COMMUNITY_MANIFEST = {
    "datasets": [
        {
            "name": "fineweb10B_sp8192",
            "tokenizer_name": "sp_bpe_8192",
            "stats": {"files_train": 128, "files_val": 1},
        },
        {
            "name": "fineweb10B_sp4096",
            "tokenizer_name": "sp_bpe_4096",
            "stats": {"files_train": 100, "files_val": 1},
        },
    ],
    "tokenizers": [
        {
            "name": "sp_bpe_8192",
            "model_path": "tokenizers/fineweb_8192_bpe.model",
            "vocab_path": "tokenizers/fineweb_8192_bpe.vocab",
        }
    ],
}
COMMUNITY = "kevclark/parameter-golf"


@pytest.fixture
def two_repo_hub(monkeypatch):
    import huggingface_hub

    hub = FakeHub(FAKE_MANIFEST, COMMUNITY_MANIFEST)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    return hub


def local_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sp8192_comes_from_the_named_repository_in_the_records_layout(tmp_path, two_repo_hub, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", COMMUNITY)  # what competitors type
    ccf.main(["--variant", "sp8192", "--train-shards", "2", "--out", str(tmp_path)])
    assert {c["repo_id"] for c in two_repo_hub.calls} == {COMMUNITY}
    folder = "datasets/datasets/fineweb10B_sp8192"
    assert two_repo_hub.requested() == [
        ("datasets", "manifest.json"),
        (folder, "fineweb_val_000000.bin"),
        (folder, "fineweb_train_000000.bin"),
        (folder, "fineweb_train_000001.bin"),
        ("datasets/tokenizers", "fineweb_8192_bpe.model"),
        ("datasets/tokenizers", "fineweb_8192_bpe.vocab"),
    ]
    # the paths the sp8192 records read: data/datasets/fineweb10B_sp8192,
    # data/tokenizers/fineweb_8192_bpe.model
    assert local_files(tmp_path) == [
        "datasets/fineweb10B_sp8192/fineweb_train_000000.bin",
        "datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
        "datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
        "datasets/fineweb10B_sp8192/manifest.json",
        "datasets/manifest.json",
        "datasets/manifest.source.json",
        "tokenizers/fineweb_8192_bpe.model",
        "tokenizers/fineweb_8192_bpe.vocab",
    ]


def test_repository_precedence_flag_then_env_then_default():
    env = {"MATCHED_FINEWEB_REPO_ID": "env/repo"}
    assert ccf.resolve_source("sp8192", "flag/repo", None, env).repo_id == "flag/repo"
    assert ccf.resolve_source("sp8192", None, None, env).repo_id == "env/repo"
    assert ccf.resolve_source("sp1024", None, None, {}).repo_id == "willdepueoai/parameter-golf"
    assert (
        ccf.resolve_source("sp1024", None, None, {"MATCHED_FINEWEB_REPO_ID": ""}).repo_id
        == ccf.OFFICIAL_REPO_ID
    )
    assert ccf.resolve_source("sp1024", None, None, env).repo_id == "env/repo"
    roots = {"MATCHED_FINEWEB_REMOTE_ROOT_PREFIX": "env_root/"}
    assert ccf.resolve_source("sp1024", None, None, roots).remote_root == "env_root"
    assert ccf.resolve_source("sp1024", None, "flag_root", roots).remote_root == "flag_root"
    with pytest.raises(ccf.DownloadError, match="not a variant name"):
        ccf.resolve_source("../sp1024", None, None, {})


@pytest.mark.parametrize("variant", ["sp4096", "sp8192"])
def test_community_variant_without_a_repository_says_what_to_set(tmp_path, fake_hub, variant):
    with pytest.raises(SystemExit) as info:
        ccf.main(["--variant", variant, "--out", str(tmp_path)])
    message = str(info.value.code)
    assert message.startswith(f"error: {variant} is not in the official export willdepueoai/parameter-golf")
    assert "--repo-id kevclark/parameter-golf" in message and "MATCHED_FINEWEB_REPO_ID=kevclark" in message
    assert "\n" not in message and fake_hub.calls == [] and not any(tmp_path.iterdir())


def test_repo_flag_wins_over_env_in_the_cli(tmp_path, two_repo_hub, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/else")
    ccf.main(["--variant", "sp8192", "--repo-id", COMMUNITY, "--train-shards", "0", "--out", str(tmp_path)])
    assert {c["repo_id"] for c in two_repo_hub.calls} == {COMMUNITY}


def test_skip_manifest_without_local_manifest_uses_the_known_layout(tmp_path, two_repo_hub, capsys):
    ccf.main(["--variant", "sp4096", "--repo-id", COMMUNITY, "--skip-manifest", "--train-shards", "1",
              "--out", str(tmp_path)])  # fmt: skip
    assert two_repo_hub.requested() == [
        ("datasets/datasets/fineweb10B_sp4096", "fineweb_val_000000.bin"),
        ("datasets/datasets/fineweb10B_sp4096", "fineweb_train_000000.bin"),
        ("datasets/tokenizers", "fineweb_4096_bpe.model"),
        ("datasets/tokenizers", "fineweb_4096_bpe.vocab"),
    ]
    assert not (tmp_path / "datasets/manifest.json").exists()
    assert "assuming 1 val shard" in capsys.readouterr().err


def test_skip_manifest_reuses_a_local_manifest_of_the_same_repository(tmp_path, two_repo_hub):
    source = ccf.Source(COMMUNITY, "datasets")
    ccf.fetch_variant("sp8192", 0, tmp_path, source)
    two_repo_hub.calls.clear()
    with pytest.raises(
        ccf.DownloadError, match="has 128 train shards.*129 requested"
    ):  # counts from the local copy
        ccf.fetch_variant("sp8192", 129, tmp_path, source, skip_manifest=True)
    ccf.fetch_variant("sp8192", 1, tmp_path, source, skip_manifest=True)
    assert "manifest.json" not in [name for _, name in two_repo_hub.requested()]
    assert (tmp_path / "datasets/fineweb10B_sp8192/fineweb_train_000000.bin").is_file()


def test_skip_manifest_refuses_a_manifest_from_another_repository(tmp_path, two_repo_hub):
    ccf.main(["--variant", "sp1024", "--train-shards", "0", "--out", str(tmp_path)])  # official manifest
    two_repo_hub.calls.clear()
    with pytest.raises(SystemExit) as info:
        ccf.main(["--variant", "sp8192", "--repo-id", COMMUNITY, "--skip-manifest", "--out", str(tmp_path)])
    message = str(info.value.code)
    assert "manifest.json came from willdepueoai/parameter-golf, not kevclark/parameter-golf" in message
    assert "without --skip-manifest" in message and two_repo_hub.calls == []
    (
        tmp_path / "datasets/manifest.source.json"
    ).unlink()  # a manifest of unknown origin is not trusted either
    with pytest.raises(ccf.DownloadError, match="came from an unrecorded repository"):
        ccf.fetch_variant(
            "sp1024", 0, tmp_path, ccf.Source(ccf.OFFICIAL_REPO_ID, "datasets"), skip_manifest=True
        )


def test_stale_manifest_from_another_repository_is_fetched_again(tmp_path, two_repo_hub, capsys):
    ccf.main(["--variant", "sp1024", "--train-shards", "0", "--out", str(tmp_path)])
    two_repo_hub.calls.clear()
    ccf.main(["--variant", "sp8192", "--repo-id", COMMUNITY, "--train-shards", "1", "--out", str(tmp_path)])
    assert two_repo_hub.requested()[0] == ("datasets", "manifest.json")
    assert two_repo_hub.calls[0]["repo_id"] == COMMUNITY
    assert "is not from kevclark/parameter-golf/datasets: fetching it again" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "datasets/manifest.json").read_text(encoding="utf-8"))
    assert manifest == COMMUNITY_MANIFEST
    record = json.loads((tmp_path / "datasets/manifest.source.json").read_text(encoding="utf-8"))
    assert record["repo_id"] == COMMUNITY
    two_repo_hub.calls.clear()
    ccf.main(["--variant", "sp8192", "--repo-id", COMMUNITY, "--train-shards", "1", "--out", str(tmp_path)])
    assert two_repo_hub.calls == []  # same repository: everything present is skipped


def test_hub_failure_is_one_line_naming_repository_and_file(tmp_path, monkeypatch):
    import huggingface_hub

    def missing(repo_id, filename, **kwargs):
        raise FileNotFoundError(f"404 Client Error\nEntry Not Found for url: .../{filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
    with pytest.raises(SystemExit) as info:
        ccf.main(["--variant", "sp8192", "--repo-id", "a/b", "--skip-manifest", "--out", str(tmp_path)])
    message = str(info.value.code)
    assert message == (
        "error: a/b: cannot download datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin "
        "(FileNotFoundError: 404 Client Error)"
    )
    assert not (tmp_path / ccf.STAGING_DIR_NAME).exists()


@pytest.mark.slow
def test_importing_download_module_does_not_import_the_hub():
    code = "import sys; import cached_challenge_fineweb; print('huggingface_hub' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=DATA_DIR, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------- shipped sample corpus


@pytest.fixture(scope="module")
def sample_manifest():
    return json.loads((SAMPLE_DIR / "manifest.json").read_text(encoding="utf-8"))


def test_sample_files_exist_and_pass_the_reader(sample_manifest):
    for name in ("fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin",
                 "tokenizer.model", "tokenizer.vocab", "manifest.json"):  # fmt: skip
        assert (SAMPLE_DIR / name).is_file(), name
    sp = bs.load_tokenizer(SAMPLE_DIR / sample_manifest["tokenizer"], 1024)
    assert sp.vocab_size() == sample_manifest["vocab_size"] == 1024
    listed = [s["file"] for split in ("val", "train") for s in sample_manifest["splits"][split]["shards"]]
    assert sorted(listed) == sorted(p.name for p in bs.existing_shards(SAMPLE_DIR))
    assert sum(p.stat().st_size for p in SAMPLE_DIR.iterdir()) < 4_000_000


def test_sample_manifest_matches_shards(sample_manifest):
    train_shards = sample_manifest["splits"]["train"]["shards"]
    assert len(train_shards) >= 2
    for split, entry in sample_manifest["splits"].items():
        stream = read_split(SAMPLE_DIR, sample_manifest, split)
        assert [len(bs.read_shard(SAMPLE_DIR / s["file"])) for s in entry["shards"]] == [
            s["tokens"] for s in entry["shards"]
        ]
        assert entry["tokens"] == len(stream)
        assert stream[0] == bs.BOS_ID and entry["docs"] == int((stream == bs.BOS_ID).sum())
        assert stream.max() < 1024
    assert 60_000 <= sample_manifest["splits"]["val"]["tokens"] <= 120_000


def test_sample_validation_documents_are_not_in_train(sample_manifest):
    sp = spm.SentencePieceProcessor(model_file=str(SAMPLE_DIR / "tokenizer.model"))
    val = {sp.decode(d.tolist()) for d in split_at_bos(read_split(SAMPLE_DIR, sample_manifest, "val"))}
    train = {sp.decode(d.tolist()) for d in split_at_bos(read_split(SAMPLE_DIR, sample_manifest, "train"))}
    assert len(val) == sample_manifest["splits"]["val"]["docs"] and not val & train


@pytest.mark.skipif(not SAMPLE_SOURCE.is_file(), reason="sample source documents not on this machine")
def test_sample_rebuild_is_byte_identical(tmp_path):
    bs.build([SAMPLE_SOURCE], tmp_path, val_docs=24, shard_tokens=600_000)
    for path in SAMPLE_DIR.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
