"""starling-data: prepare a corpus for a run (filtered, deduplicated, tokenised, sharded).

starling-data prepare SOURCES... --out DIR
starling-data prepare-chat CONVERSATIONS... --out DIR
starling-data teacher-targets DATASET --teacher CHECKPOINT --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.prepared import PrepareError, PrepareSettings, load_manifest, manifest_digest
from peer.command_line import OneLineParser, positive_float, positive_int, setup_logging
from peer.run_config import ObjectiveSection

PROG = "starling-data"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    prepare = commands.add_parser("prepare", help="filter, deduplicate, tokenise and shard text into a folder")
    add = prepare.add_argument
    add("sources", nargs="+", type=Path, help=".txt/.md/.rst, .jsonl or .parquet files, or folders of them")
    add("--out", type=Path, required=True, help="the folder to write the shards and manifest.json into (new or empty)")
    defaults = PrepareSettings()
    add("--seq-len", type=positive_int, default=defaults.seq_len, help="tokens per sequence (the run's [data] seq_len)")
    add("--sequences-per-shard", type=positive_int, default=defaults.sequences_per_shard, help="sequences per shard")
    add("--text-field", default=defaults.text_field, help="the field of JSON lines and the column of Parquet files")
    add("--min-words", type=positive_int, default=defaults.min_words, help="shorter documents are dropped")
    add("--flagged-words", type=Path, help="a file of words, one a line: documents with too many are dropped")
    add("--max-flagged-ratio", type=ratio, default=defaults.max_flagged_ratio, help="share of flagged words allowed")
    add("--log-level", default="INFO", choices=LOG_LEVELS)
    chat = commands.add_parser("prepare-chat", help="render, deduplicate and shard conversations for fine-tuning")
    add = chat.add_argument
    add("sources", nargs="+", type=Path, help=".jsonl files of conversations (one a line), or folders of them")
    add("--out", type=Path, required=True, help="the folder to write the shards and manifest.json into (new or empty)")
    add("--seq-len", type=positive_int, default=defaults.seq_len, help="tokens per sequence (the run's [data] seq_len)")
    add("--sequences-per-shard", type=positive_int, default=defaults.sequences_per_shard, help="sequences per shard")
    add("--log-level", default="INFO", choices=LOG_LEVELS)
    targets = commands.add_parser(
        "teacher-targets", help="add a teacher's top-k log-probs to a prepared dataset, for distillation"
    )
    add = targets.add_argument
    add("dataset", type=Path, help="a text dataset prepared with starling-data prepare")
    add("--teacher", type=Path, required=True, help="the teacher: a Starling or transformers checkpoint folder")
    add("--out", type=Path, required=True, help="the folder to write the shards and manifest.json into (new or empty)")
    add("--top-k", type=positive_int, default=16, help="the teacher's most likely tokens kept at each position")
    add(
        "--temperature",
        type=positive_float,
        default=ObjectiveSection.temperature,
        help="of the teacher's distribution (the run's objective.temperature)",
    )
    add("--log-level", default="INFO", choices=LOG_LEVELS)
    return parser


def prepare_from(parsed: argparse.Namespace) -> None:
    """Run the command's preparation (raises PrepareError, OSError or UnicodeDecodeError)."""
    if parsed.command == "teacher-targets":
        from coordinator.teacher_targets import add_teacher_targets

        add_teacher_targets(parsed.dataset, parsed.teacher, parsed.out, parsed.top_k, parsed.temperature)
        return
    if parsed.command == "prepare-chat":
        from coordinator.prepare_chat import prepare_chat

        prepare_chat(parsed.sources, parsed.out, parsed.seq_len, parsed.sequences_per_shard)
        return
    from coordinator.prepare import prepare

    flagged = frozenset()
    if parsed.flagged_words is not None:
        flagged = frozenset(parsed.flagged_words.read_text(encoding="utf-8").split())
    settings = PrepareSettings(
        seq_len=parsed.seq_len,
        sequences_per_shard=parsed.sequences_per_shard,
        text_field=parsed.text_field,
        min_words=parsed.min_words,
        flagged_words=flagged,
        max_flagged_ratio=parsed.max_flagged_ratio,
    )
    prepare(parsed.sources, parsed.out, settings)


def main(argv: list[str] | None = None) -> int:
    parsed = build_parser().parse_or_exit_code(argv)
    if isinstance(parsed, int):
        return parsed
    setup_logging(parsed.log_level)
    try:
        prepare_from(parsed)
    except ImportError as error:
        print(f"{PROG}: error: {error.name} is missing: pip install 'starling[data]'", file=sys.stderr)
        return 2
    except (PrepareError, OSError, UnicodeDecodeError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    # What the organiser puts in the run configuration to hand the dataset to peers.
    manifest = load_manifest(parsed.out)
    print(f'[data]\npath = "{parsed.out}"\ndataset = "{manifest_digest(parsed.out)}"\nseq_len = {manifest.seq_len}')
    if parsed.command == "prepare-chat":
        print('[objective]\nkind = "sft"')
    if manifest.teacher_targets is not None:
        targets = manifest.teacher_targets
        print(
            f'[objective]\nkind = "distill"\nteacher_sha256 = "{targets["teacher_sha256"]}"\n'
            f"temperature = {targets['temperature']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
