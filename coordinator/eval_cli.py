"""starling-eval: a checkpoint's loss on a prepared dataset, as a user reads it.

    starling-eval --checkpoint DIR --data PREPARED_DIR [--sequences N] [--batch-size B] [--teacher DIR]

The checkpoint is a coordinator's (runs/<run_id>/checkpoints/epoch-NNNNNN), `starling-train
--save`'s, or a transformers Mistral, Mixtral or BLOOM folder; the data a folder that `starling-data
prepare` (text: the loss on every next token) or `prepare-chat` (conversations: the loss on the
assistant's tokens only) wrote, ideally a split held out of training. It prints one JSON object:
loss (nats per token that carries the loss), perplexity, tokens, sequences and data ("text" or
"conversations"), and with --teacher (a distilled student's teacher) kl: the mean KL(teacher ||
model) of their next-token distributions over those tokens.
"""

from __future__ import annotations

import json
import sys

import transformers

from model.adapters import load_checkpoint
from model.evaluate import check_vocabulary, evaluate
from model.prepared import PreparedDataError, load_prepared
from peer.command_line import OneLineParser, positive_int

PROG = "starling-eval"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder")
    parser.add_argument("--data", required=True, help="a prepared dataset folder (starling-data prepare[-chat])")
    parser.add_argument("--sequences", type=positive_int, help="evaluate the first N sequences only")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    parser.add_argument("--teacher", help="a teacher checkpoint: also the mean KL(teacher || model) per token")
    parsed = parser.parse_or_exit_code(argv)
    if isinstance(parsed, int):
        return parsed
    transformers.utils.logging.disable_progress_bar()  # stdout and stderr say what came out, nothing else
    try:
        manifest, sequences = load_prepared(parsed.data)
        model = load_checkpoint(parsed.checkpoint)
        sequences = sequences[: parsed.sequences]
        check_vocabulary(manifest, model.config.vocab_size, f"--data {parsed.data}")
        teacher = load_checkpoint(parsed.teacher) if parsed.teacher else None
        result = evaluate(model, sequences, manifest.chat, parsed.batch_size, teacher)
    except (PreparedDataError, ValueError, OSError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({**result, "data": "conversations" if manifest.chat else "text"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
