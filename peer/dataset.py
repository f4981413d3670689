"""A prepared dataset that a peer downloads shard by shard as it trains, each shard checked.

The run names the dataset by the SHA-256 of its manifest (model/prepared.py), and the run record
that carries that digest is signed by the coordinator: a manifest whose digest differs is refused,
and every shard is checked against the manifest's digest for it before it is trained on. Shards are
downloaded over HTTP(S) (from the coordinator, which serves the prepared folder, or any static
location), resumed with a range request after an interruption, kept in a cache folder under a size
limit (least recently used first out), and the next epoch's shard is fetched in the background.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model.data import cache_dir, check_fits
from model.prepared import MANIFEST, Manifest, PreparedDataError, ShardEntry, parse_shard, write_atomic

logger = logging.getLogger("starling.peer")

ATTEMPTS = 3  # downloads of a shard (or manifest) before the peer gives up on it
REQUEST_TIMEOUT = 30.0  # seconds without a byte from the server
BLOCK = 1 << 16


class DatasetError(ValueError):
    """A dataset that cannot be downloaded or checked; the message names the file and where from."""


def default_cache() -> Path:
    return cache_dir() / "datasets"


def _download(url: str, part: Path, expected_bytes: int | None, label: str) -> None:
    """Append the rest of `url` to `part`, from where it stops (a range request), with progress."""
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
        if response.status != 206:  # the server sends it whole: start again
            done = 0
        with (
            open(part, "ab" if done else "wb") as out,
            tqdm(total=expected_bytes, initial=done, desc=label, unit="B", unit_scale=True, disable=None) as bar,
        ):
            for block in iter(lambda: response.read(BLOCK), b""):
                out.write(block)
                bar.update(len(block))


def _fetch_checked(url: str, path: Path, sha256: str, expected_bytes: int | None, label: str) -> bytes:
    """The bytes at `url` whose SHA-256 is `sha256`, saved to `path` atomically; DatasetError after
    ATTEMPTS downloads that fail or do not match."""
    part = path.with_name(f".{path.name}.part")
    problem = ""
    for _ in range(ATTEMPTS):
        try:
            _download(url, part, expected_bytes, label)
        except (OSError, urllib.error.URLError) as error:  # resumed on the next attempt
            if getattr(error, "code", None) == 416:  # nothing left to send from there: start again
                part.unlink(missing_ok=True)
            problem = f"cannot be downloaded ({getattr(error, 'reason', None) or error})"
            continue
        data = part.read_bytes()
        part.unlink()
        if hashlib.sha256(data).hexdigest() == sha256:
            write_atomic(path, data)
            return data
        problem = "failed its SHA-256 check"
        logger.warning("%s from %s %s: downloading it again", label, url, problem)
    raise DatasetError(f"{label} from {url} {problem} {ATTEMPTS} times: the run's data cannot be used")


def fetch_manifest(url: str, digest: str, folder: Path) -> Manifest:
    """The manifest at `url` (a dataset's folder address) whose SHA-256 is `digest`, kept in `folder`."""
    path = folder / MANIFEST
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
        data = path.read_bytes()
    else:
        folder.mkdir(parents=True, exist_ok=True)
        data = _fetch_checked(url.rstrip("/") + "/" + MANIFEST, path, digest, None, "the dataset's manifest")
    try:
        return Manifest.from_json(data.decode("utf-8"), f"{url} {MANIFEST}")
    except (PreparedDataError, UnicodeDecodeError) as error:
        raise DatasetError(str(error)) from None


class RemoteDataset:
    """The shards of a prepared dataset at `url`, downloaded into `cache` as they are needed.

    `sequences_of(shard)` returns a shard's rows, downloading it first if it is not cached (or its
    cached copy fails its digest); `prefetch(shard)` starts that download in the background. The
    cached shards take at most `cache_limit_bytes` beyond the shards in use. `chat`: the run
    fine-tunes on conversations (model.chat), and the dataset must hold them."""

    def __init__(
        self, url: str, digest: str, seq_len: int, cache: Path, cache_limit_bytes: int, chat: bool = False
    ) -> None:
        self.url = url.rstrip("/") + "/"
        self.folder = cache / digest
        self.manifest = fetch_manifest(self.url, digest, self.folder)
        try:
            check_fits(self.manifest, seq_len, f"the run's dataset at {self.url}", chat)
        except ValueError as error:
            raise DatasetError(str(error)) from None
        if not self.manifest.shards:
            raise DatasetError(f"the run's dataset at {self.url} has no shards")
        self.cache_limit_bytes = cache_limit_bytes
        self._locks = [threading.Lock() for _ in self.manifest.shards]  # one download of a shard at a time
        self._in_use: set[int] = set()
        self._guard = threading.Lock()
        self.downloads = 0  # shards downloaded by this process

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def teacher_targets(self) -> dict | None:
        return self.manifest.teacher_targets

    def sequences_of(self, shard: int) -> torch.Tensor:
        """The [sequences, seq_len] rows of shard `shard`, checked against the manifest."""
        entry = self.manifest.shards[shard]
        with self._guard:
            self._in_use = {shard}
        data = self._ensure(shard)  # its SHA-256 is the manifest's: not hashed again here
        return parse_shard(data, f"{self.url}{entry.file}")

    def prefetch(self, shard: int) -> None:
        """Download shard `shard` in the background, if it is not cached."""
        if not (self.folder / self.manifest.shards[shard].file).is_file():
            threading.Thread(target=self._prefetch, args=(shard,), name="dataset prefetch", daemon=True).start()

    def _prefetch(self, shard: int) -> None:
        try:
            self._ensure(shard)
        except DatasetError as error:  # the training loop meets it again when it needs the shard
            logger.warning("%s", error)

    def _ensure(self, shard: int) -> bytes:
        entry = self.manifest.shards[shard]
        path = self.folder / entry.file
        with self._locks[shard]:
            if path.is_file():
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest() == entry.sha256:
                    os.utime(path)  # recently used: evicted last
                    return data
                logger.warning("cached %s fails its SHA-256 check: downloading it again", path)
            data = self._download(entry, path)
        self._evict(keep={shard, *self._in_use})
        return data

    def _download(self, entry: ShardEntry, path: Path) -> bytes:
        started = time.monotonic()
        data = _fetch_checked(self.url + entry.file, path, entry.sha256, entry.bytes, f"shard {entry.file}")
        self.downloads += 1
        logger.debug("downloaded %s (%d bytes) in %.2f s", entry.file, entry.bytes, time.monotonic() - started)
        return data

    def cached_bytes(self) -> int:
        return sum(path.stat().st_size for path in self._cached_files())

    def _cached_files(self) -> list[Path]:
        names = {entry.file for entry in self.manifest.shards}
        return [path for path in self.folder.iterdir() if path.name in names]

    def _evict(self, keep: set[int]) -> None:
        """Remove the least recently used shards until the others fit the cache limit."""
        kept = {self.manifest.shards[index].file for index in keep}
        with self._guard:
            files = sorted(self._cached_files(), key=lambda path: path.stat().st_mtime)
            total = sum(path.stat().st_size for path in files if path.name not in kept)
            for path in files:
                if total <= self.cache_limit_bytes:
                    break
                if path.name not in kept:
                    total -= path.stat().st_size
                    path.unlink(missing_ok=True)
