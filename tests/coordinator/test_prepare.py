"""starling-data prepare: what it keeps and removes, its determinism, its shards, its errors."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest

from coordinator.data_cli import main
from coordinator.prepare import filter_documents, prepare_cached, read_documents, source_files
from model.data import load_corpus
from model.prepared import PreparedDataError, PrepareSettings, load_manifest, load_prepared, manifest_digest
from model.tokenizer import load_tokenizer

WORDS = (
    "the of and to in that is was he for it with as his on be at by this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what "
    "up its about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might great old year"
).split()
FLAGGED = "zorp"


def prose(seed: int, words: int = 160) -> str:
    """English-like text that passes Gopher's filters: common words, sentences of 8-15 words."""
    rng, sentences, count = random.Random(seed), [], 0
    while count < words:
        length = rng.randint(8, 15)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        count += length
    return " ".join(sentences)


def verse(seed: int, lines: int = 40) -> str:
    """A scene of a play: speakers' names and short, heavily punctuated lines, as in the bundled plays.
    Cut into words with its punctuation apart, fewer than 80% of its words hold a letter."""
    rng = random.Random(seed)
    speakers = ("HAMLET.", "HORATIO.", "OPHELIA.", "LAERTES.")
    said = []
    for _ in range(lines):
        words = [rng.choice(WORDS) + ("," if rng.random() < 0.5 else "") for _ in range(rng.randint(5, 8))]
        said.append(f"{rng.choice(speakers)} {' '.join(words).capitalize().rstrip(',')}{rng.choice('.!?;')}")
    return "\n".join(said)


def symbols(seed: int, count: int = 200) -> str:
    """Mostly symbols, a few words, nothing repeated often enough for the repetition filter."""
    rng = random.Random(seed)
    marks = "#$%&*@+=~^|<>"
    return " ".join(
        rng.choice(WORDS) if rng.random() < 0.1 else "".join(rng.choice(marks) for _ in range(rng.randint(1, 4)))
        for _ in range(count)
    )


def corpus(folder: Path) -> tuple[list[Path], set[str], dict[str, str]]:
    """Sources in the three formats, the ids of the documents to keep, and the texts by id."""
    texts = {f"good{i}": prose(i) for i in range(8)} | {"verse": verse(8)}
    near = texts["good3"].split(" ")
    near[10], near[40] = "ocean", "harbour"
    bad = {
        "repeated lines": "buy the best shoes now\n" * 60,
        "mostly symbols": symbols(7),
        "flagged": " ".join(f"{word} {FLAGGED}," if i % 10 == 0 else word for i, word in enumerate(prose(50).split())),
        "too short": prose(77, words=40),
        "exact duplicate": texts["good2"],
        "near duplicate": " ".join(near),
    }
    texts["good5"] = texts["good5"] + " Write to jane.doe@mail.org or to 8.8.8.8 for the rest."
    folder.mkdir()
    (folder / "plays").mkdir()
    for i in range(3):
        (folder / "plays" / f"good{i}.txt").write_text(texts[f"good{i}"])
    (folder / "plays" / "verse.txt").write_text(texts["verse"])
    (folder / "plays" / "bad.txt").write_text(bad["repeated lines"])
    with open(folder / "web.jsonl", "w") as lines:
        for name in ("good3", "good4", "good5"):
            lines.write(json.dumps({"text": texts[name], "url": name}) + "\n")
        for name in ("mostly symbols", "flagged", "too short"):
            lines.write(json.dumps({"text": bad[name]}) + "\n")
    rows = [texts["good6"], bad["exact duplicate"], texts["good7"], bad["near duplicate"]]
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), folder / "books.parquet")
    flagged = folder / "flagged.txt"
    flagged.write_text(f"{FLAGGED}\nquux\n")
    return [folder / "plays", folder / "web.jsonl", folder / "books.parquet"], set(texts), texts


def test_the_filters_keep_exactly_the_good_documents_and_count_what_they_removed(tmp_path):
    sources, good, texts = corpus(tmp_path / "corpus")
    documents = list(read_documents(source_files(sources), "text"))
    kept, steps = filter_documents(documents, PrepareSettings(flagged_words=frozenset({FLAGGED})))

    kept_texts = [text for _, text in kept]
    assert len(kept) == len(good)
    for name, text in texts.items():
        if name != "good5":
            assert text in kept_texts, name
    (with_pii,) = [text for text in kept_texts if "Write to" in text]
    assert "jane.doe@mail.org" not in with_pii and "8.8.8.8" not in with_pii
    assert "email@example.com" in with_pii

    removed = {step["name"]: step["documents_in"] - step["documents_out"] for step in steps}
    assert removed == {
        "personal data": 0,
        "repetition": 1,
        "quality": 2,
        "flagged words": 1,
        "exact duplicates": 1,
        "near duplicates": 1,
    }
    reasons = {step["name"]: step["removed"] for step in steps}
    assert reasons["quality"].keys() <= {"gopher_short_doc", "gopher_below_alpha_threshold", "gopher_too_many_symbols"}
    assert "gopher_short_doc" in reasons["quality"]
    assert reasons["flagged words"] == {"flagged_words": 1}
    assert steps[0]["documents_in"] == len(documents) == 15


def test_preparing_twice_gives_the_same_shards_which_hold_every_sequence(tmp_path):
    sources, good, _ = corpus(tmp_path / "corpus")
    flagged = ["--flagged-words", str(tmp_path / "corpus" / "flagged.txt")]
    arguments = ["prepare", *map(str, sources), *flagged, "--seq-len", "32", "--sequences-per-shard", "10"]
    command = [sys.executable, "-m", "coordinator.data_cli"]
    for out in ("first", "second"):
        subprocess.run([*command, *arguments, "--out", str(tmp_path / out)], check=True, timeout=300)

    assert manifest_digest(tmp_path / "first") == manifest_digest(tmp_path / "second")
    first, second = (sorted((tmp_path / out).iterdir()) for out in ("first", "second"))
    assert [path.read_bytes() for path in first] == [path.read_bytes() for path in second]

    manifest, sequences = load_prepared(tmp_path / "first")
    assert manifest.documents == len(good) and manifest.seq_len == 32
    assert len(manifest.shards) == -(-manifest.sequences // 10) and len(sequences) == manifest.sequences
    assert manifest.tokens == sequences.numel()
    tokenizer = load_tokenizer()
    stream = sequences.flatten().tolist()
    assert stream.count(tokenizer.bos_id) in (len(good) - 1, len(good))  # the last document may end in the cut tail
    assert load_corpus(tmp_path / "first", seq_len=32).sequences.equal(sequences)  # --data takes the folder
    with pytest.raises(ValueError, match="sequences of 32 tokens, the run's are of 64"):
        load_corpus(tmp_path / "first", seq_len=64)


def test_a_corrupted_shard_is_refused_by_its_digest(tmp_path):
    sources, _, _ = corpus(tmp_path / "corpus")
    assert main(["prepare", *map(str, sources), "--seq-len", "32", "--out", str(tmp_path / "out")]) == 0
    shard = tmp_path / "out" / load_manifest(tmp_path / "out").shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(PreparedDataError, match=f"{shard}: its SHA-256 is not the manifest's"):
        load_prepared(tmp_path / "out")


def bad_input(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "only-bad.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "ok.txt").write_text(prose(1))
    return {
        "missing source": ([str(tmp_path / "nowhere")], f"{tmp_path / 'nowhere'}: no such file or folder"),
        "bad JSON line": ([str(tmp_path / "bad.jsonl")], f"{tmp_path / 'bad.jsonl'}: cannot be read"),
        "not UTF-8": ([str(tmp_path / "latin1.txt")], f"{tmp_path / 'latin1.txt'}: cannot be read"),
        "nothing left": ([str(tmp_path / "only-bad.jsonl")], "no document is left after filtering"),
        "output not empty": ([str(tmp_path / "ok.txt"), "--out", str(tmp_path / "full")], "output folder is not empty"),
    }


@pytest.mark.parametrize("case", ["missing source", "bad JSON line", "not UTF-8", "nothing left", "output not empty"])
def test_bad_input_is_one_line_naming_it_and_exit_status_2(tmp_path, capsys, case):
    arguments, message = bad_input(tmp_path)[case]
    if "--out" not in arguments:
        arguments = [*arguments, "--out", str(tmp_path / "out")]
    assert main(["prepare", *arguments, "--log-level", "WARNING"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("starling-data: error: ") and message in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_corpus_prepared_at_first_use_is_kept_and_prepared_again_when_damaged(tmp_path, monkeypatch):
    """The way the demo's bundled plays go: prepared once into the cache, used again while every
    shard checks against the manifest, prepared again when one does not."""
    monkeypatch.setenv("STARLING_CACHE", str(tmp_path / "cache"))
    sources, good, _ = corpus(tmp_path / "corpus")
    settings = PrepareSettings(seq_len=32, sequences_per_shard=10, flagged_words=frozenset({FLAGGED}))
    folder = prepare_cached(sources, settings)
    digest = manifest_digest(folder)
    assert load_manifest(folder).documents == len(good)
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no scratch folder left behind

    shard = folder / load_manifest(folder).shards[-1].file
    prepared_at = shard.stat().st_mtime_ns
    assert prepare_cached(sources, settings) == folder and shard.stat().st_mtime_ns == prepared_at

    shard.write_bytes(shard.read_bytes()[:-1] + b"\0")
    assert prepare_cached(sources, settings) == folder and manifest_digest(folder) == digest
    assert load_prepared(folder)[0].documents == len(good)

    other = prepare_cached(sources, PrepareSettings(seq_len=16, sequences_per_shard=10))
    assert other != folder and load_manifest(other).seq_len == 16
