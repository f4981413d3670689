"""Precompute a teacher's top-k next-token log-probs into a prepared text dataset, so that the peers
of a distillation run (objective.kind = "distill") need not hold the teacher.

    starling-data teacher-targets DATASET --teacher CHECKPOINT --out DIR [--top-k 16] [--temperature 2.0]

Every shard of DATASET (from starling-data prepare) becomes a shard of the same sequences in the
same order, each row followed by the teacher's k most likely next tokens at each position and their
log-probs at the run's temperature (model.prepared.rows_with_teacher_targets); the manifest keeps
the dataset's steps and records the teacher's SHA-256 and vocabulary size, k and T. A peer training
on it learns the bucketed KL (model.objectives.bucketed_teacher_kl), which differs from the full
KL by the teacher's mass outside its top-k times the KL within that tail.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from model.objectives import load_teacher, teacher_top_k
from model.prepared import (
    MANIFEST,
    Manifest,
    PreparedDataError,
    PrepareError,
    load_manifest,
    read_shard,
    rows_with_teacher_targets,
    write_atomic,
    write_shard,
)

logger = logging.getLogger("starling.data")

TARGET_BYTES = 4  # ids and float32 log-probs share the shard's uint32 values


def add_teacher_targets(
    data: Path, teacher: Path, out: Path, top_k: int, temperature: float, batch_size: int = 8
) -> Manifest:
    """Write `data`'s sequences with `teacher`'s top-k log-probs at `temperature` into `out` (new or
    empty); the new manifest. PrepareError naming the input that cannot be used."""
    if out.exists() and any(out.iterdir()):
        raise PrepareError(f"{out}: the output folder is not empty")
    try:
        manifest = load_manifest(data)
    except PreparedDataError as error:
        raise PrepareError(str(error)) from None
    if manifest.chat:
        raise PrepareError(f"{data}: holds conversations; teacher targets are computed for text datasets")
    if manifest.teacher_targets is not None:
        raise PrepareError(f"{data}: already carries teacher targets")
    try:
        model, sha256 = load_teacher(teacher)
    except ValueError as error:
        raise PrepareError(f"--teacher: {error}") from None
    vocab = model.config.vocab_size
    if top_k > vocab:
        raise PrepareError(f"--top-k {top_k}: the teacher's vocabulary has {vocab} tokens")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    with tqdm(total=manifest.sequences, desc="teacher targets", unit="seq", disable=None) as bar:
        for entry in manifest.shards:
            try:
                tokens = read_shard(data / entry.file, entry)
            except PreparedDataError as error:
                raise PrepareError(str(error)) from None
            if int(tokens.max()) >= vocab:
                raise PrepareError(
                    f"{data / entry.file}: token ids up to {int(tokens.max())} do not fit the teacher's "
                    f"vocabulary of {vocab}"
                )
            ids, log_probs = [], []
            with torch.no_grad():
                for batch in tokens.split(batch_size):
                    top = teacher_top_k(model(batch.to(device)).logits, top_k, temperature)
                    ids.append(top[0].cpu())
                    log_probs.append(top[1].cpu())
                    bar.update(len(batch))
            rows = rows_with_teacher_targets(tokens, torch.cat(ids), torch.cat(log_probs))
            shards.append(write_shard(rows, out / entry.file, TARGET_BYTES))
    targets = {"teacher_sha256": sha256, "top_k": top_k, "temperature": temperature, "vocab_size": vocab}
    result = dataclasses.replace(manifest, shards=shards, teacher_targets=targets)
    write_atomic(out / MANIFEST, result.to_json().encode())
    logger.info(
        "wrote the teacher's top-%d log-probs of %d sequences into %s (%d bytes)",
        top_k,
        result.sequences,
        out,
        sum(shard.bytes for shard in shards),
    )
    return result
