"""Prepared datasets: packed token sequences in shard files, described by a manifest.

`starling-data prepare` (coordinator/prepare.py) writes them; peers read them (`--data FOLDER`).

A shard file is a 24-byte header, then the tokens, little-endian, row after row:
    magic        8 bytes  b"STRLSHRD"
    version      uint16   FORMAT_VERSION
    token bytes  uint8    2 (uint16 ids) or 4 (uint32 ids)
    (padding)    1 byte   zero
    seq_len      uint32   tokens per sequence
    sequences    uint64   rows in the file
No pickle anywhere: the header is parsed field by field and the body read as plain integers.

manifest.json names the tokenizer (the SHA-256 of its model file), the sequence length, every shard
(file, bytes, sequences, SHA-256) in order, and what the preparation kept and removed at each
step. A shard whose digest differs from the manifest's is refused. The manifest's own digest
(`manifest_digest`) is what a run names and signs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

MAGIC = b"STRLSHRD"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHBxIQ")
MANIFEST = "manifest.json"
TOKEN_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


class PreparedDataError(ValueError):
    """A prepared dataset that cannot be used: the message names the file and what is wrong."""


class PrepareError(ValueError):
    """Input that cannot be prepared (coordinator.prepare); the message names it."""


@dataclass(frozen=True)
class PrepareSettings:
    """How coordinator.prepare prepares a corpus; recorded in the manifest."""

    seq_len: int = 256  # tokens per sequence: the run's [data] seq_len
    sequences_per_shard: int = 1024
    text_field: str = "text"  # of JSON lines and Parquet rows
    min_words: int = 50  # Gopher's shortest document
    flagged_words: frozenset[str] = frozenset()
    max_flagged_ratio: float = 0.01  # of a document's words

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flagged_words": sorted(self.flagged_words)}


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the manifest's folder
    bytes: int
    sequences: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    seq_len: int
    tokenizer_sha256: str
    shards: list[ShardEntry]
    documents: int  # documents kept
    tokens: int  # tokens in the shards (sequences x seq_len)
    steps: list[dict[str, Any]] = field(default_factory=list)  # per step: name, documents in/out, removed by reason
    settings: dict[str, Any] = field(default_factory=dict)  # PrepareSettings.as_dict()
    format_version: int = FORMAT_VERSION
    chat: bool = False  # conversations for fine-tuning (model.chat's sequences), not text

    @property
    def sequences(self) -> int:
        return sum(shard.sequences for shard in self.shards)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            raw = json.loads(text)
            shards = [ShardEntry(**entry) for entry in raw.pop("shards")]
            manifest = cls(shards=shards, **raw)
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise PreparedDataError(f"{where}: not a Starling dataset manifest ({error})") from None
        if manifest.format_version != FORMAT_VERSION:
            raise PreparedDataError(
                f"{where}: format version {manifest.format_version}, this Starling reads {FORMAT_VERSION}"
            )
        return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write data to path whole or not at all (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def shard_bytes(sequences: np.ndarray, vocab_size: int) -> bytes:
    """The shard file holding these [n, seq_len] token rows."""
    token_bytes = 2 if vocab_size <= 1 << 16 else 4
    rows, seq_len = sequences.shape
    header = HEADER.pack(MAGIC, FORMAT_VERSION, token_bytes, seq_len, rows)
    return header + np.ascontiguousarray(sequences, dtype=TOKEN_DTYPES[token_bytes]).tobytes()


def write_shards(sequences: np.ndarray, out: Path, sequences_per_shard: int, vocab_size: int) -> list[ShardEntry]:
    """Write [n, seq_len] token rows into shard files of `sequences_per_shard` rows in `out` (made
    if missing), in order; their manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    starts = range(0, len(sequences), sequences_per_shard)
    for start in tqdm(starts, desc="writing shards", unit="shard", disable=None):
        rows = sequences[start : start + sequences_per_shard]
        data = shard_bytes(rows, vocab_size)
        name = f"shard-{len(shards):05d}.bin"
        write_atomic(out / name, data)
        shards.append(ShardEntry(name, len(data), len(rows), hashlib.sha256(data).hexdigest()))
    return shards


def read_shard(path: Path, expected: ShardEntry | None = None) -> torch.Tensor:
    """The [sequences, seq_len] int64 rows of a shard file, checked against its manifest entry."""
    return parse_shard(path.read_bytes(), str(path), expected)


def parse_shard(data: bytes, where: str, expected: ShardEntry | None = None) -> torch.Tensor:
    """The [sequences, seq_len] int64 rows of a shard's bytes, checked against its manifest entry."""
    if expected is not None and hashlib.sha256(data).hexdigest() != expected.sha256:
        raise PreparedDataError(f"{where}: its SHA-256 is not the manifest's (a corrupted or replaced shard)")
    if len(data) < HEADER.size:
        raise PreparedDataError(f"{where}: too short for a shard header")
    magic, version, token_bytes, seq_len, rows = HEADER.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or token_bytes not in TOKEN_DTYPES:
        raise PreparedDataError(f"{where}: not a Starling shard of format version {FORMAT_VERSION}")
    if len(data) != HEADER.size + rows * seq_len * token_bytes:
        raise PreparedDataError(f"{where}: its size does not match its header ({rows} sequences of {seq_len})")
    if expected is not None and rows != expected.sequences:
        raise PreparedDataError(f"{where}: holds {rows} sequences, the manifest says {expected.sequences}")
    tokens = np.frombuffer(data, dtype=TOKEN_DTYPES[token_bytes], offset=HEADER.size)
    return torch.from_numpy(tokens.astype(np.int64)).view(rows, seq_len)


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / MANIFEST


def is_prepared(folder: str | os.PathLike) -> bool:
    return manifest_path(folder).is_file()


def manifest_digest(folder: str | os.PathLike) -> str:
    """The SHA-256 of the manifest file: what a run names to say which dataset it trains on."""
    return sha256_of(manifest_path(folder))


def load_manifest(folder: str | os.PathLike) -> Manifest:
    path = manifest_path(folder)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PreparedDataError(f"{path}: cannot be read ({error})") from None
    return Manifest.from_json(text, str(path))


def load_prepared(folder: str | os.PathLike) -> tuple[Manifest, torch.Tensor]:
    """The manifest and all sequences of a prepared dataset, every shard checked against it."""
    manifest = load_manifest(folder)
    rows = [read_shard(Path(folder) / shard.file, shard) for shard in manifest.shards]
    for shard, got in zip(manifest.shards, rows):
        if got.shape != (shard.sequences, manifest.seq_len):
            raise PreparedDataError(
                f"{Path(folder) / shard.file}: holds {tuple(got.shape)}, the manifest says otherwise"
            )
    sequences = torch.cat(rows) if rows else torch.zeros(0, manifest.seq_len, dtype=torch.long)
    return manifest, sequences
