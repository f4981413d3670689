"""Data for a run, prepared and handed out: `starling-data prepare` on a corpus of at least
--megabytes of text made from what this machine has (the bundled plays, Python's documentation
sources where python3.11-doc is installed, then the standard library's and installed packages'
sources and documents, one document per file), its throughput per stage and what each filter
removed; then a peer downloading the prepared shards from the coordinator's server (each checked
against the manifest), on loopback and, as root, from a network namespace capped at --cap Mbit/s
(benchmarks/netlab.py).

    python benchmarks/data.py [--megabytes 100] [--cap 20] [--download-megabytes 16]

Prints a table and writes benchmarks/results/data-cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

from prometheus_client import CollectorRegistry  # noqa: E402

from benchmarks import netlab  # noqa: E402
from benchmarks.measure import write_json  # noqa: E402
from coordinator.prepare import prepare  # noqa: E402
from coordinator.server import DashboardServer  # noqa: E402
from model.data import bundled_corpus_files  # noqa: E402
from model.prepared import MANIFEST, PrepareSettings, manifest_digest  # noqa: E402

SEQ_LEN = 256
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
PROSE_SUFFIXES = (".txt", ".rst", ".md")
CODE_SUFFIXES = (".py",)


def text_files() -> list[Path]:
    """Files of text on this machine, in the order they are taken."""
    found = list(bundled_corpus_files())
    if PYTHON_DOCS.is_dir():
        found += sorted(PYTHON_DOCS.rglob("*.txt"))
    roots = [Path(sysconfig.get_paths()[name]) for name in ("stdlib", "purelib")]
    for suffixes in (PROSE_SUFFIXES, CODE_SUFFIXES):  # prose first: code is what the filters should remove
        for root in roots:
            found += sorted(path for path in root.rglob("*") if path.suffix in suffixes and path.is_file())
    return found


def write_corpus(path: Path, megabytes: float) -> dict:
    """A JSON-lines corpus of at least `megabytes` of UTF-8 text, one document per file."""
    size = documents = 0
    with open(path, "w", encoding="utf-8") as out:
        for file in text_files():
            try:
                text = file.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            out.write(json.dumps({"text": text}) + "\n")
            size, documents = size + len(text.encode()), documents + 1
            if size >= megabytes * 1e6:
                break
    return {"documents": documents, "megabytes": size / 1e6}


def download(url: str, digest: str, cache: Path, limit_bytes: int) -> dict:
    """In this process: download the dataset's shards in order up to `limit_bytes`, as a peer does."""
    from peer.dataset import RemoteDataset

    started = time.perf_counter()
    dataset = RemoteDataset(url, digest, SEQ_LEN, cache, cache_limit_bytes=1 << 40)
    total = 0
    for shard, entry in enumerate(dataset.manifest.shards):
        if total >= limit_bytes:
            break
        dataset.sequences_of(shard)
        total += entry.bytes
    return {"bytes": total, "seconds": time.perf_counter() - started}


def download_in(wrap: list[str], url: str, digest: str, limit_bytes: int) -> dict:
    """download() in a process of its own (inside a lab host's namespace when `wrap` says so)."""
    with tempfile.TemporaryDirectory(prefix="starling-cache-") as cache:
        command = [*wrap, sys.executable, __file__, "--download", url, digest, cache, str(limit_bytes)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["mbit_per_second"] = result["bytes"] * 8 / 1e6 / result["seconds"]
    return result


@contextlib.contextmanager
def serving(host: str, files: tuple[Path, frozenset[str]]) -> Iterator[str]:
    """The coordinator's server, serving a prepared dataset on `host`; yields its /data/ address."""
    server = DashboardServer(host, 0, dict, lambda since: [], CollectorRegistry(), dataset=files)
    server.start()
    try:
        yield server.url + "data/"
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=float, default=100.0, help="text to prepare")
    parser.add_argument("--cap", type=float, default=20.0, help="Mbit/s of the capped download (root)")
    parser.add_argument("--download-megabytes", type=float, default=16.0, help="shard bytes each download takes")
    parser.add_argument("--download", nargs=4, metavar=("URL", "DIGEST", "CACHE", "BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.download:
        url, digest, cache, limit = args.download
        print(json.dumps(download(url, digest, Path(cache), int(limit))))
        return

    with tempfile.TemporaryDirectory(prefix="starling-data-bench-") as scratch:
        corpus = write_corpus(Path(scratch) / "corpus.jsonl", args.megabytes)
        seconds: dict[str, float] = {}
        out = Path(scratch) / "prepared"
        manifest = prepare([Path(scratch) / "corpus.jsonl"], out, PrepareSettings(seq_len=SEQ_LEN), seconds)
        near = manifest.steps[-1]["documents_in"]
        handled = {"near duplicates": near, "tokenising": manifest.documents, "writing shards": manifest.documents}
        stages = [
            {
                "stage": stage,
                "seconds": took,
                "documents": handled.get(stage, corpus["documents"]),
                "documents_per_second": handled.get(stage, corpus["documents"]) / took,
                "tokens_per_second": manifest.tokens / took if stage in ("tokenising", "writing shards") else None,
            }
            for stage, took in seconds.items()
        ]
        removed = [
            {
                "step": step["name"],
                "documents_in": step["documents_in"],
                "removed": step["documents_in"] - step["documents_out"],
                "fraction": (step["documents_in"] - step["documents_out"]) / max(1, step["documents_in"]),
            }
            for step in manifest.steps
        ]

        limit = int(args.download_megabytes * 1e6)
        files = (out, frozenset({MANIFEST, *(shard.file for shard in manifest.shards)}))
        digest = manifest_digest(out)
        with serving("127.0.0.1", files) as url:
            downloads = {"loopback": download_in([], url, digest, limit)}
        why_no_lab = netlab.why_no_lab()
        if why_no_lab is None:
            with netlab.Lab(hosts=1) as lab, serving(lab.gateway, files) as url:
                lab.cap(lab.hosts[0], args.cap)
                downloads[f"{args.cap:g} Mbit/s"] = download_in(lab.hosts[0].command([]), url, digest, limit)

    tokens_per_second = manifest.tokens / sum(seconds.values())
    payload = {
        "corpus": corpus,
        "kept_documents": manifest.documents,
        "tokens": manifest.tokens,
        "shards": len(manifest.shards),
        "tokens_per_second_overall": tokens_per_second,
        "stages": stages,
        "removed": removed,
        "downloads": downloads,
        "lab": why_no_lab or "used",
    }
    path = write_json("data-cpu.json", payload)
    print(f"corpus: {corpus['documents']} documents, {corpus['megabytes']:.1f} MB; kept {manifest.documents}")
    print("| stage | s | documents | documents/s | tokens/s |\n|---|---|---|---|---|")
    for row in stages:
        tokens = "" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.0f}"
        print(
            f"| {row['stage']} | {row['seconds']:.1f} | {row['documents']} | {row['documents_per_second']:.0f} "
            f"| {tokens} |"
        )
    print("| step | documents in | removed | fraction |\n|---|---|---|---|")
    for row in removed:
        print(f"| {row['step']} | {row['documents_in']} | {row['removed']} | {row['fraction']:.3f} |")
    print("| download | MB | s | Mbit/s |\n|---|---|---|---|")
    for name, row in downloads.items():
        print(f"| {name} | {row['bytes'] / 1e6:.1f} | {row['seconds']:.2f} | {row['mbit_per_second']:.1f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
