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
A dataset with teacher targets (starling-data teacher-targets) stores uint32 rows of the tokens,
then the teacher's top-k ids and float32 log-probs (their bit patterns) at every position:
seq_len x (1 + 2k) values, the header's seq_len being that row width.

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
    # A teacher's top-k log-probs after each row's tokens (starling-data teacher-targets):
    # {"teacher_sha256", "top_k", "temperature", "vocab_size"}; None for tokens alone.
    teacher_targets: dict[str, Any] | None = None

    @property
    def sequences(self) -> int:
        return sum(shard.sequences for shard in self.shards)

    @property
    def row_width(self) -> int:
        """Values per row of a shard: the tokens, then the teacher targets' ids and log-probs."""
        top_k = self.teacher_targets["top_k"] if self.teacher_targets else 0
        return self.seq_len * (1 + 2 * top_k)

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


def token_bytes_for(vocab_size: int) -> int:
    """The bytes per token of a shard of this vocabulary's ids."""
    return 2 if vocab_size <= 1 << 16 else 4


def shard_bytes(sequences: np.ndarray, token_bytes: int) -> bytes:
    """The shard file holding these [n, seq_len] rows of unsigned values of `token_bytes` bytes."""
    rows, seq_len = sequences.shape
    header = HEADER.pack(MAGIC, FORMAT_VERSION, token_bytes, seq_len, rows)
    return header + np.ascontiguousarray(sequences, dtype=TOKEN_DTYPES[token_bytes]).tobytes()


def write_shards(sequences: np.ndarray, out: Path, sequences_per_shard: int, token_bytes: int) -> list[ShardEntry]:
    """Write [n, seq_len] rows into shard files of `sequences_per_shard` rows in `out` (made if
    missing), in order; their manifest entries."""
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    starts = range(0, len(sequences), sequences_per_shard)
    for start in tqdm(starts, desc="writing shards", unit="shard", disable=None):
        rows = sequences[start : start + sequences_per_shard]
        shards.append(write_shard(rows, out / f"shard-{len(shards):05d}.bin", token_bytes))
    return shards


def write_shard(rows: np.ndarray, path: Path, token_bytes: int) -> ShardEntry:
    """Write one shard file of these [n, seq_len] rows; its manifest entry."""
    data = shard_bytes(rows, token_bytes)
    write_atomic(path, data)
    return ShardEntry(path.name, len(data), len(rows), hashlib.sha256(data).hexdigest())


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


def load_prepared(folder: str | os.PathLike, with_teacher_targets: bool = False) -> tuple[Manifest, torch.Tensor]:
    """The manifest and all sequences of a prepared dataset, every shard checked against it: rows
    of tokens, or whole rows with the teacher targets if it has them and `with_teacher_targets`."""
    manifest = load_manifest(folder)
    rows = [read_shard(Path(folder) / shard.file, shard) for shard in manifest.shards]
    for shard, got in zip(manifest.shards, rows):
        if got.shape != (shard.sequences, manifest.row_width):
            raise PreparedDataError(
                f"{Path(folder) / shard.file}: holds {tuple(got.shape)}, the manifest says otherwise"
            )
    sequences = torch.cat(rows) if rows else torch.zeros(0, manifest.row_width, dtype=torch.long)
    return manifest, sequences if with_teacher_targets else sequences[:, : manifest.seq_len]


def rows_with_teacher_targets(tokens: torch.Tensor, top_ids: torch.Tensor, top_log_probs: torch.Tensor) -> np.ndarray:
    """Shard rows of [n, seq_len] tokens followed by a teacher's [n, seq_len, k] top-k ids and float32
    log-probs (as their bit patterns): uint32 [n, seq_len x (1 + 2k)]."""
    n = len(tokens)
    bits = top_log_probs.float().contiguous().view(torch.int32).numpy().view(np.uint32)
    return np.concatenate(
        [tokens.numpy().astype(np.uint32), top_ids.reshape(n, -1).numpy().astype(np.uint32), bits.reshape(n, -1)],
        axis=1,
    )


TokensAndTargets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_teacher_targets(rows: torch.Tensor, seq_len: int, top_k: int) -> TokensAndTargets:
    """The tokens [n, seq_len], top-k ids [n, seq_len, k] and log-probs (float32) of int64 shard rows
    written by rows_with_teacher_targets, on the rows' device."""
    n, width = len(rows), seq_len * top_k
    tokens, ids, bits = rows[:, :seq_len], rows[:, seq_len : seq_len + width], rows[:, seq_len + width :]
    as_int32 = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)  # the uint32 bit patterns
    return tokens, ids.reshape(n, seq_len, top_k), as_int32.view(torch.float32).reshape(n, seq_len, top_k)
