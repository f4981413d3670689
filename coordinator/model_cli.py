"""starling-model: make a student for distillation out of a parent checkpoint.

    starling-model prune --from CHECKPOINT --layers N --intermediate-size M --hidden-size H --out DIR
                         [--data CALIBRATION] [--sequences 32] [--seq-len 128]

keeps the parent's most important layers, MLP channels and hidden dimensions, judged on a
calibration batch (model.prune), and saves a Starling checkpoint that a run names as `init_from`
in `[model]` (with an `[objective] kind = "distill"` whose teacher is the parent). The calibration
data is a prepared dataset (text or conversations), a text file or folder, or by default the
bundled plays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import transformers

from model.adapters import load_checkpoint
from model.chat import inputs_and_labels
from model.data import load_corpus
from model.prepared import PreparedDataError, is_prepared, load_prepared
from model.prune import prune
from peer.command_line import OneLineParser, positive_int

PROG = "starling-model"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    command = commands.add_parser("prune", help="a smaller student from a parent's most important parts")
    add = command.add_argument
    add("--from", dest="parent", required=True, help="the parent: a Starling or transformers checkpoint folder")
    add("--layers", type=positive_int, required=True, help="transformer blocks to keep")
    add("--intermediate-size", type=positive_int, required=True, help="MLP channels to keep in each block")
    add("--hidden-size", type=positive_int, required=True, help="hidden dimensions to keep")
    add("--out", type=Path, required=True, help="the folder to save the student into (new or empty)")
    add("--data", help="calibration data: a prepared dataset, a text file or folder (default: the bundled plays)")
    add("--sequences", type=positive_int, default=32, help="calibration sequences")
    add("--seq-len", type=positive_int, default=128, help="tokens per calibration sequence (text data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parsed = build_parser().parse_or_exit_code(argv)
    if isinstance(parsed, int):
        return parsed
    transformers.utils.logging.disable_progress_bar()
    try:
        if parsed.out.exists() and any(parsed.out.iterdir()):
            raise ValueError(f"{parsed.out}: the output folder is not empty")
        parent = load_checkpoint(parsed.parent)
        if parsed.data is not None and is_prepared(parsed.data):
            manifest, sequences = load_prepared(parsed.data)
            batch = (inputs_and_labels(sequences)[0] if manifest.chat else sequences)[: parsed.sequences]
        else:
            batch = load_corpus(parsed.data, seq_len=parsed.seq_len).sequences[: parsed.sequences]
        if int(batch.max()) >= parent.config.vocab_size:
            raise ValueError(
                f"the calibration data's tokens go beyond the parent's vocabulary of {parent.config.vocab_size}"
            )
        student = prune(parent, batch, parsed.layers, parsed.intermediate_size, parsed.hidden_size)
        student.save_pretrained(parsed.out)
    except (PreparedDataError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    kept, whole = (sum(p.numel() for p in model.parameters()) for model in (student, parent))
    print(f"{parsed.out}: {kept:,} parameters, {kept / whole:.0%} of the parent's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
