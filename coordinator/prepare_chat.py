"""Prepare conversations for a fine-tuning run (objective.kind = "sft").

    starling-data prepare-chat CONVERSATIONS... --out DIR [--seq-len N]

Sources are JSON lines files (.jsonl, or folders of them), one conversation a line:
{"messages": [{"role": "system" | "user" | "assistant" | "tool", ...}, ...], "tools": [...]},
the last message the assistant's. Each is rendered with Mistral's v3 instruct template (model.chat),
cut after its last assistant turn that fits in the sequence length and padded; the steps, counted
in the manifest: exact duplicates (the same conversation twice, the first kept) and too long (not
even the first assistant turn fits). A conversation that does not parse or render is an error
naming its file and line. The shards and manifest are those of `starling-data prepare`
(model.prepared), marked as conversations; preparing twice gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from model.chat import CHAT_VOCAB, ChatError, chat_tokenizer_sha256, parse_conversation, render, sequence_of
from model.prepared import MANIFEST, Manifest, PrepareError, token_bytes_for, write_atomic, write_shards

logger = logging.getLogger("starling.data")

SUFFIX = ".jsonl"


def conversation_files(sources: list[Path]) -> list[Path]:
    """Every .jsonl file of the sources, in a fixed order; anything else is an error naming it."""
    files = []
    for source in sources:
        if source.is_dir():
            found = sorted(p for p in source.rglob(f"*{SUFFIX}") if p.is_file())
            if not found:
                raise PrepareError(f"{source}: no {SUFFIX} files in this folder")
            files.extend(found)
        elif source.is_file() and source.suffix == SUFFIX:
            files.append(source)
        else:
            raise PrepareError(f"{source}: not a {SUFFIX} file or a folder of them")
    return files


def prepare_chat(sources: list[Path], out: Path, seq_len: int, sequences_per_shard: int = 1024) -> Manifest:
    """Render, deduplicate, cut and pad every conversation of the sources, and write the shards and
    manifest into `out` (new or empty)."""
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out}: the output folder is not empty")
    files = conversation_files(sources)
    rows, seen, total, duplicates, too_long = [], set(), 0, 0, 0
    for path in files:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(tqdm(lines, desc=f"rendering {path.name}", unit="chat", disable=None), 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                total += 1
                try:
                    chat = render(parse_conversation(json.loads(line), where), where)
                except json.JSONDecodeError as error:
                    raise PrepareError(f"{where}: not JSON ({error.msg})") from None
                except ChatError as error:
                    raise PrepareError(str(error)) from None
                digest = hashlib.sha256(np.asarray(chat.tokens, dtype=np.int64).tobytes()).digest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
                row = sequence_of(chat, seq_len)
                if row is None:
                    too_long += 1
                    continue
                rows.append(row)
    if not rows:
        raise PrepareError(
            f"{', '.join(map(str, sources))}: no conversation left ({total} read, {duplicates} duplicates, "
            f"{too_long} whose first assistant turn ends beyond {seq_len} tokens)"
        )
    sequences = np.stack(rows)
    shards = write_shards(sequences, out, sequences_per_shard, token_bytes_for(2 * CHAT_VOCAB))
    steps = [
        dict(
            name="exact duplicates", documents_in=total, documents_out=total - duplicates, removed={"exact": duplicates}
        ),
        dict(name="too long", documents_in=total - duplicates, documents_out=len(rows), removed={"too_long": too_long}),
    ]
    manifest = Manifest(
        seq_len=seq_len,
        tokenizer_sha256=chat_tokenizer_sha256(),
        shards=shards,
        documents=len(rows),
        tokens=int(sequences.size),
        steps=steps,
        settings=dict(seq_len=seq_len, sequences_per_shard=sequences_per_shard),
        chat=True,
    )
    write_atomic(out / MANIFEST, manifest.to_json().encode())
    trained = int((sequences < CHAT_VOCAB).sum())
    logger.info(
        "prepared %d of %d conversations into %d shards of sequences of %d tokens (%d duplicates, %d too long; "
        "%.0f%% of the tokens are the assistant's)",
        len(rows),
        total,
        len(shards),
        seq_len,
        duplicates,
        too_long,
        100 * trained / sequences.size,
    )
    return manifest
