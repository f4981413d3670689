"""Prepare a corpus for a run, as the data teams of BLOOM (ROOTS) and FineWeb did: read, remove
personal data, filter for quality, deduplicate exactly and nearly, tokenise once, pack into
sequences and write shards with a manifest (model/prepared.py).

    starling-data prepare SOURCES... --out DIR [--seq-len N] [--flagged-words FILE]

Sources are text files (.txt, .md, .rst: one document each), JSON lines (.jsonl: one document per
line, its "text" field) and Parquet files (.parquet: one per row, its "text" column), or folders
of them (searched recursively). The steps, in order, each counted in the manifest:
- personal data: e-mail addresses and public IP addresses replaced (datatrove's PIIFormatter);
- repetition: Gopher's duplicate-line, duplicate-paragraph and n-gram repetition limits (datatrove);
- quality: Gopher's word count (too short, too long), mean word length, symbol and non-alphabetic
  word ratios, stop words (datatrove);
- flagged words: documents whose share of words from the organiser's list exceeds the limit;
- exact duplicates: the same text twice, the first kept;
- near duplicates: MinHash with 5-word shingles, 14 bands of 8 hashes (datatrove's four stages).
Words are whitespace-delimited, as Gopher's rules count them (WhitespaceWordTokenizer): a word of
prose keeps its punctuation, which would otherwise count as words without a letter (cut apart,
the punctuation of verse put 32 of the 42 bundled plays below Gopher's 80% of words with a letter).
datatrove's own English tokenizer cuts punctuation apart too, and needs spaCy.

The output is a function of the inputs and the settings alone: preparing twice gives the same bytes.
Each stage shows a progress bar on a terminal (none when stderr is a file or a pipe).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet
from datatrove.data import Document
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer
from loguru import logger as datatrove_logger
from tqdm.auto import tqdm

from model.data import TEXT_SUFFIXES, cache_dir, pack
from model.prepared import (
    MANIFEST,
    Manifest,
    PreparedDataError,
    PrepareError,
    PrepareSettings,
    is_prepared,
    load_prepared,
    token_bytes_for,
    write_atomic,
    write_shards,
)
from model.tokenizer import load_tokenizer

logger = logging.getLogger("starling.data")
datatrove_logger.remove()  # datatrove logs every stage at INFO through loguru; its counts go to the manifest

JSON_LINES_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SOURCE_SUFFIXES = TEXT_SUFFIXES + JSON_LINES_SUFFIXES + PARQUET_SUFFIXES


def source_files(sources: list[Path]) -> list[Path]:
    """Every readable source file, in a fixed order; a missing source is an error naming it."""
    files = []
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)
            if not found:
                raise PrepareError(f"{source}: no {', '.join(SOURCE_SUFFIXES)} files in this folder")
            files.extend(found)
        elif source.is_file():
            if source.suffix not in SOURCE_SUFFIXES:
                raise PrepareError(f"{source}: not a source ({', '.join(SOURCE_SUFFIXES)})")
            files.append(source)
        else:
            raise PrepareError(f"{source}: no such file or folder")
    return files


def read_documents(files: list[Path], text_field: str) -> Iterator[tuple[str, str]]:
    """(id, text) of every document, in order: a file's documents are numbered from 0."""
    for path in files:
        try:
            if path.suffix in TEXT_SUFFIXES:
                yield f"{path}:0", path.read_text(encoding="utf-8")
            elif path.suffix in JSON_LINES_SUFFIXES:
                with open(path, encoding="utf-8") as lines:
                    for number, line in enumerate(lines):
                        if line.strip():
                            yield f"{path}:{number}", _text_of(json.loads(line), text_field, f"line {number + 1}")
            else:
                column = pyarrow.parquet.read_table(path, columns=[text_field]).column(text_field)
                for number, text in enumerate(column.to_pylist()):
                    yield f"{path}:{number}", _text_of({text_field: text}, text_field, f"row {number}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as error:
            if isinstance(error, PrepareError):
                raise PrepareError(f"{path}: {error}") from None
            raise PrepareError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None


def _text_of(record: object, text_field: str, where: str) -> str:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise PrepareError(f"{where} has no {text_field!r} string")
    return text


def prepare(
    sources: list[Path], out: Path, settings: PrepareSettings | None = None, seconds: dict[str, float] | None = None
) -> Manifest:
    """Run every step on the sources and write the shards and the manifest into `out`; `seconds`,
    when given, receives the time each stage took (reading, filtering, near duplicates,
    tokenising, writing shards)."""
    settings = settings or PrepareSettings()
    seconds = {} if seconds is None else seconds
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out}: the output folder is not empty")
    files = source_files(sources)
    with _timed(seconds, "reading"):
        documents = list(tqdm(read_documents(files, settings.text_field), desc="reading", unit="doc", disable=None))
    if not documents:
        raise PrepareError(f"{', '.join(map(str, sources))}: no documents")
    kept, steps = filter_documents(documents, settings, seconds)
    if not kept:
        raise PrepareError(f"{', '.join(map(str, sources))}: no document is left after filtering ({_removed(steps)})")

    tokenizer = load_tokenizer()
    with _timed(seconds, "tokenising"):
        pieces = [
            np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int64)
            for _, text in tqdm(kept, desc="tokenising", unit="doc", disable=None)
        ]
        sequences = pack(np.concatenate(pieces), settings.seq_len).numpy()
    if len(sequences) == 0:
        raise PrepareError(f"the {len(kept)} documents kept hold fewer tokens than one sequence of {settings.seq_len}")

    with _timed(seconds, "writing shards"):
        shards = write_shards(sequences, out, settings.sequences_per_shard, token_bytes_for(tokenizer.vocab_size))
    manifest = Manifest(
        seq_len=settings.seq_len,
        tokenizer_sha256=tokenizer.sha256,
        shards=shards,
        documents=len(kept),
        tokens=int(sequences.size),
        steps=steps,
        settings=settings.as_dict(),
    )
    write_atomic(out / MANIFEST, manifest.to_json().encode())
    logger.info(
        "prepared %d of %d documents into %d sequences of %d tokens in %d shards (%s)",
        len(kept),
        len(documents),
        len(sequences),
        settings.seq_len,
        len(shards),
        _removed(steps),
    )
    return manifest


def prepare_cached(sources: list[Path], settings: PrepareSettings) -> Path:
    """The folder of `sources` prepared with `settings`, prepared at first use and kept in the
    cache (STARLING_CACHE) under a digest of the sources' bytes, the tokenizer and the settings;
    a cached folder is used again once every shard checks against its manifest."""
    files = source_files(sources)
    key = hashlib.sha256(json.dumps(settings.as_dict(), sort_keys=True).encode())
    key.update(load_tokenizer().sha256.encode())
    for path in files:
        key.update(hashlib.sha256(path.read_bytes()).digest())
    folder = cache_dir() / "prepared" / key.hexdigest()[:24]
    if folder.is_dir():
        try:
            load_prepared(folder)
            return folder
        except (PreparedDataError, OSError) as error:
            logger.warning("preparing %s again: %s", folder, error)
            shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        prepare(files, scratch, settings)
        os.rename(scratch, folder)  # whole or not at all; a concurrent first use may have won the race
    except OSError:
        if not is_prepared(folder):
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def filter_documents(
    documents: list[tuple[str, str]], settings: PrepareSettings, seconds: dict[str, float] | None = None
) -> tuple[list[tuple[str, str]], list[dict]]:
    """The documents kept, in order, and per step: its name, documents in and out, and the number
    removed for each reason; `seconds`, when given, receives the time of the filtering and of the
    near-duplicate removal."""
    seconds = {} if seconds is None else seconds
    words = WhitespaceWordTokenizer("en")
    streaming = [
        ("personal data", PIIFormatter()),
        ("repetition", GopherRepetitionFilter(language=words)),
        ("quality", GopherQualityFilter(min_doc_words=settings.min_words, language=words)),
        ("flagged words", FlaggedWordsFilter(settings.flagged_words, settings.max_flagged_ratio)),
        ("exact duplicates", ExactDuplicatesFilter()),
    ]
    stream: Iterator = (Document(text=text, id=doc_id) for doc_id, text in documents)
    for _, step in streaming:
        stream = step.run(stream, 0, 1)
    with _timed(seconds, "filtering"):
        remaining = [
            (doc.id, doc.text) for doc in tqdm(stream, desc="filtering", unit="doc", total=len(documents), disable=None)
        ]
    steps = [_step_counts(name, step.stats.stats) for name, step in streaming]
    with _timed(seconds, "near duplicates"):
        remaining, near = remove_near_duplicates(remaining, words)
    return remaining, [*steps, near]


def remove_near_duplicates(documents: list[tuple[str, str]], words) -> tuple[list[tuple[str, str]], dict]:
    """datatrove's MinHash deduplication, its four stages run here in a scratch folder."""
    if len(documents) < 2:
        return documents, dict(
            name="near duplicates", documents_in=len(documents), documents_out=len(documents), removed={}
        )
    config = MinhashConfig(hash_config=HashConfig(hash_fc="sha1"))  # xxhash's path fails on str in datatrove 0.10
    docs = [Document(text=text, id=doc_id) for doc_id, text in documents]
    with tempfile.TemporaryDirectory(prefix="starling-minhash-") as scratch:
        signatures, buckets, removals = (f"{scratch}/{part}" for part in ("signatures", "buckets", "removals"))
        _run_stage(MinhashDedupSignature(signatures, config=config, language=words), iter(docs))
        for bucket in range(config.num_buckets):
            _run_stage(MinhashDedupBuckets(signatures, buckets, config=config), None, bucket, config.num_buckets)
        with contextlib.redirect_stderr(io.StringIO()):  # its own progress bar, even off a terminal
            _run_stage(MinhashDedupCluster(buckets, removals, config=config), None)
        near_filter = MinhashDedupFilter(removals)
        kept = [(doc.id, doc.text) for doc in near_filter.run(iter(docs), 0, 1)]
    counts = _step_counts("near duplicates", near_filter.stats.stats)
    counts["documents_in"] = len(documents)
    return kept, counts


@contextlib.contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = time.perf_counter() - started


def _run_stage(step, data, rank: int = 0, world_size: int = 1) -> None:
    """Run a datatrove stage whose output goes to files (its run() may or may not be a generator)."""
    for _ in step.run(data, rank, world_size) or ():
        pass


def _step_counts(name: str, stats: dict) -> dict:
    total = {key: int(value.total) for key, value in stats.items()}
    documents_in = total.get("total", 0)
    dropped = total.get("dropped", 0)
    reasons = {key.removeprefix("dropped_"): count for key, count in total.items() if key.startswith("dropped_")}
    return dict(
        name=name, documents_in=documents_in, documents_out=documents_in - dropped, removed=reasons or {name: dropped}
    )


def _removed(steps: list[dict]) -> str:
    return ", ".join(f"{step['name']}: {step['documents_in'] - step['documents_out']} removed" for step in steps)


class WhitespaceWordTokenizer(WordTokenizer):
    """Whitespace-delimited words and sentences cut by a regular expression: what datatrove's
    Gopher filters and MinHash shingles need (counts and spans), without spaCy."""

    WORD = re.compile(r"\S+")
    SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+[\"'”’)]*|\n|$)")

    def word_tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [match.group().strip() for match in self.SENTENCE.finditer(text) if match.group().strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [match.span() for match in self.SENTENCE.finditer(text) if match.group().strip()]


class FlaggedWordsFilter(BaseFilter):
    """Drops a document when more than `max_ratio` of its words are on the organiser's list
    (ROOTS's flagged-words filter; the list is the organiser's, none is shipped)."""

    name = "flagged words"

    WORD = re.compile(r"\w+(?:['’]\w+)*")  # letters and digits alone: "word," is the listed "word"

    def __init__(self, flagged: frozenset[str], max_ratio: float) -> None:
        super().__init__()
        self.flagged, self.max_ratio = frozenset(w.lower() for w in flagged), max_ratio

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if not self.flagged:
            return True
        words = [word.lower() for word in self.WORD.findall(doc.text)]
        flagged = sum(word in self.flagged for word in words)
        return flagged <= self.max_ratio * max(1, len(words)) or (False, "flagged_words")


class ExactDuplicatesFilter(BaseFilter):
    """Drops a document whose text (its SHA-256) came before."""

    name = "exact duplicates"

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[bytes] = set()

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        digest = hashlib.sha256(doc.text.encode()).digest()
        if digest in self.seen:
            return False, "exact_duplicate"
        self.seen.add(digest)
        return True
