"""The run configuration: everything peers must agree on to train together.

It is read from a TOML file (sections [model], [data], [training], [diloco], [objective], [averaging],
[coordinator]) and checked strictly: an unknown key, a value of the wrong type or an inconsistent model gives a
RunConfigError that names the key. The coordinator publishes it in the DHT (peer/run_record.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import ModelConfig
from model.chat import CHAT_VOCAB

# The choices of the run's settings, as the sections' field types: reading a run configuration
# checks them from these types (_matches), and the registries that implement them (peer.optimizer,
# peer.compression, peer.averager) are tested to hold exactly these names.
Optimizer = Literal["adamw", "adamw8bit", "lamb8bit", "sgd"]
Mode = Literal["batch", "diloco"]
Objective = Literal["pretrain", "sft", "distill"]
Compression = Literal["adaptive-8bit", "fp16", "none"]
# Pseudo-gradients take every gradient codec, and 4 bits too: a loss that DiLoCo's error feedback
# sends in the next round (batch mode's gradients have no such feedback).
PseudoGradientCompression = Literal[Compression, "blockwise-4bit"]
Aggregation = Literal["centered-clip", "mean"]
AuthMode = Literal["open", "token"]
OPTIMIZERS, MODES, OBJECTIVES = typing.get_args(Optimizer), typing.get_args(Mode), typing.get_args(Objective)
COMPRESSIONS, PSEUDO_GRADIENT_COMPRESSIONS = typing.get_args(Compression), typing.get_args(PseudoGradientCompression)
AGGREGATIONS, AUTH_MODES = typing.get_args(Aggregation), typing.get_args(AuthMode)
MAX_OUTER_LR = 2.0  # beyond it the outer step overshoots the averaged inner progress
# How all-reduce messages carry averages (peer.averager.SharedAverages: the average itself, where
# hivemind sends each member its difference from it). Peers of other formats would misread each
# other's averages: the training key holds it, so they never average together.
ALLREDUCE_FORMAT = 2
URL_SCHEMES = ("http://", "https://")


class RunConfigError(ValueError):
    """A run configuration that cannot be trained; the message names the key."""


@dataclass
class ModelSection:
    preset: str = "demo"
    overrides: dict[str, Any] = field(default_factory=dict)
    kernels: str = "auto"
    # A transformers checkpoint directory on the coordinator's machine to start the run from.
    init_from: str | None = None


@dataclass
class DataSection:
    path: str | None = None  # None: the bundled corpus; with dataset, the coordinator's prepared folder
    dataset: str | None = None  # SHA-256 of a prepared dataset's manifest: peers download it, checked
    url: str | None = None  # where peers download the dataset from; None: from the coordinator
    seq_len: int = 128
    num_shards: int = 64


@dataclass
class TrainingSection:
    # "batch": every epoch is one optimizer step on the swarm's averaged gradient (DeDLOC).
    # "diloco": every epoch is an outer round of local inner steps, then one averaged outer step ([diloco]).
    mode: Mode = "batch"
    target_batch_size: int = 64  # batch mode: samples the swarm accumulates per epoch
    optimizer: Optimizer = "adamw"
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    warmup_epochs: int = 10
    total_epochs: int = 1000
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class DilocoSection:
    """The outer rounds of training.mode = "diloco". Each peer takes inner steps with the run's
    optimizer ([training]: its lr, betas and schedule, with epochs counting rounds) on its own data
    until the swarm has processed samples_per_round; the peers then average their pseudo-gradients
    (round-start parameters minus their own, weighted by the samples each processed) and all take
    the same outer step: SGD with Nesterov momentum."""

    samples_per_round: int = 1024  # samples the whole swarm processes between two outer steps
    inner_batch_size: int = 16  # samples per inner step on each peer (micro-batches accumulate to it)
    # DiLoCo's outer step (Douillard et al., 2023), made for runs of many rounds: its momentum
    # builds up to 7 times a round's pseudo-gradient. A run of tens of rounds ends lower with
    # outer_momentum = 0 (benchmarks/README.md, DiLoCo's convergence).
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # Nesterov; 0 for plain SGD
    compression: PseudoGradientCompression = "adaptive-8bit"  # the pseudo-gradient's codec
    # What a lossy codec did not send is added to the next round's pseudo-gradient.
    error_feedback: bool = True
    # Average a round's pseudo-gradients in the background while the next round's inner steps run,
    # and apply the outer step as soon as it is done, one round late: compute never waits on the network.
    overlap: bool = False


@dataclass
class AveragingSection:
    matchmaking_time: float = 5.0
    averaging_timeout: float = 60.0
    # Seconds a group member may take to send its next part before the round goes on without it.
    # hivemind's default (matchmaking_time) dropped peers of a loaded 2-core machine from rounds.
    part_timeout: float = 10.0
    compression: Compression = "adaptive-8bit"
    # How each reducer combines the peers' parts: "centered-clip" (robust to a minority of broken
    # or hostile peers, peer.robust) or hivemind's weighted "mean".
    aggregation: Aggregation = "centered-clip"
    # Tensors with at least this many values go over the wire in 8 bits, smaller ones in 16.
    compression_threshold: int = 2**16
    # Parameters and AdamW's moments travel in float32 (3 x 4 bytes per parameter), several times a
    # gradient round in 8 bits: the parameters alone, averaged every epoch, slowed a 20 Mbit/s swarm of
    # the tiny model by 29% (benchmarks/wan.py). Gradients are averaged exactly every epoch, so peers
    # drift only by codec error and missed rounds in between.
    average_state_every: int = 5
    offload_optimizer: bool = True
    delay_optimizer_step: bool = False
    # Peers a group holds at most: a leader starts the round once it has this many. None: one group
    # of every peer whose matchmaking overlaps (hivemind's default). See benchmarks/README.md (Scale).
    target_group_size: int | None = None
    # Moshpit averaging: peers look for groups under 2^group_key_bits matchmaking keys, and each
    # member of a group moves to another key after its round, so that rounds still mix every
    # peer's values. Each peer looking for a group reads its key's list of peers twice a second:
    # each node holding a key of N peers uploads 2 N (53 N + 1,400) bytes a second, a 20 Mbit/s
    # link at 141 peers a key. 0: one key, every round an exact average of the peers that met.
    # See benchmarks/README.md (Scale).
    group_key_bits: int = 0

    @property
    def request_timeout(self) -> float:
        """Seconds matchmaking waits for a would-be leader's answer. hivemind breaks cycles of join
        requests with it and warns when it is not below the matchmaking time: its 3 s default, or
        half the matchmaking time when that is shorter."""
        return min(3.0, self.matchmaking_time / 2)

    def initial_group_bits(self, peer_id: bytes) -> str:
        """The bits of the first matchmaking key of the peer with this id: from the id's hash, so
        that peers spread evenly over the keys."""
        if self.group_key_bits == 0:
            return ""
        index = int.from_bytes(hashlib.sha256(peer_id).digest()[:4], "big") % 2**self.group_key_bits
        return format(index, f"0{self.group_key_bits}b")

    def matchmaking_options(self, peer_id: bytes) -> dict[str, Any]:
        """hivemind's matchmaking settings of the peer with this id (its DHT's `peer_id.to_bytes()`),
        the same for every averager of the peer (gradients or pseudo-gradients, and state)."""
        return dict(
            request_timeout=self.request_timeout,
            target_group_size=self.target_group_size,
            initial_group_bits=self.initial_group_bits(peer_id),
        )


@dataclass
class CoordinatorSection:
    checkpoint_every: int = 10  # epochs between two checkpoints
    keep_checkpoints: int = 3
    auth: AuthMode = "open"  # "token": peers need an access token issued by the coordinator
    # The most its polls of the swarm's records may download on average, Mbit/s. A poll downloads
    # both records from every node that holds them, 5-6 copies, 13 KB a peer: at 10 Mbit/s, the
    # polls of more than about 95 peers come further apart than a second (coordinator.poll_wait).
    poll_mbit: float = 10.0


@dataclass
class ObjectiveSection:
    # "pretrain": next-token loss on the data. "sft": next-token loss on the assistant's tokens of
    # conversations (prepared by starling-data prepare-chat; model.chat). "distill": also match a
    # frozen teacher's next-token distribution: its top-k log-probs when the run's dataset carries
    # them (starling-data teacher-targets), else the teacher itself, run beside the student on each
    # peer (model.objectives).
    kind: Objective = "pretrain"
    teacher: str | None = None  # distill: a Starling or transformers checkpoint folder, without teacher targets
    teacher_sha256: str | None = None  # distill: SHA-256 of its weights file: what peers and targets are checked by
    temperature: float = 2.0  # distill: of both distributions
    kl_weight: float = 0.5  # distill: loss = kl_weight x T^2 x KL(teacher || student) + (1 - kl_weight) x next-token

    def check_teacher_targets(self, targets: dict, vocab_size: int) -> None:
        """ValueError unless a dataset's teacher targets (model.prepared.Manifest.teacher_targets) are
        this objective's teacher's, at its temperature, over a vocabulary of `vocab_size` tokens."""
        if targets["teacher_sha256"] != self.teacher_sha256:
            raise ValueError(
                f"the run's data carries the top-k of another teacher (SHA-256 {targets['teacher_sha256'][:16]}..., "
                f"objective.teacher_sha256 {str(self.teacher_sha256)[:16]}...)"
            )
        if targets["temperature"] != self.temperature:
            raise ValueError(
                f"the run's data carries teacher log-probs at temperature {targets['temperature']}, "
                f"objective.temperature is {self.temperature}"
            )
        if targets["vocab_size"] != vocab_size:
            raise ValueError(
                f"the run's data carries the top-k of a teacher of {targets['vocab_size']} tokens, "
                f"the run's model has {vocab_size}"
            )


@dataclass
class RunConfig:
    run_id: str = "starling-demo"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    averaging: AveragingSection = field(default_factory=AveragingSection)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)

    @property
    def samples_per_epoch(self) -> int:
        """Samples the swarm processes per epoch: the target batch, or in DiLoCo mode the round."""
        return self.diloco.samples_per_round if self.training.mode == "diloco" else self.training.target_batch_size

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_preset(self.model.preset, kernels=self.model.kernels, **self.model.overrides)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as from_dict reads it ([diloco] only in that mode)."""
        data = dataclasses.asdict(self)
        if self.training.mode != "diloco":
            del data["diloco"]
        return data

    def training_key(self) -> str:
        """The prefix of the run's averaging and progress records in the DHT: the run id and a
        fingerprint of what all of its peers must agree on (the model's shape, the data's sequence
        length, sharding and prepared dataset, the training section). A peer with another
        configuration of the same run id averages with nobody of this run and never counts toward
        its epochs. Local choices (kernels, the corpus path and download address, averaging and
        coordinator settings) are left out; the outer rounds ([diloco]) are in it when the run
        trains in that mode, the objective when it is not plain pretraining, and the format of
        all-reduce messages (ALLREDUCE_FORMAT)."""
        agreed = {
            "allreduce_format": ALLREDUCE_FORMAT,
            "model": {"preset": self.model.preset, "overrides": self.model.overrides},
            "data": {"seq_len": self.data.seq_len, "num_shards": self.data.num_shards, "dataset": self.data.dataset},
            "training": dataclasses.asdict(self.training),
        }
        if self.training.mode == "diloco":
            agreed["diloco"] = dataclasses.asdict(self.diloco)
        if self.objective.kind != "pretrain":  # the teacher by its digest: its path is each peer's own
            agreed["objective"] = {**dataclasses.asdict(self.objective), "teacher": None}
        digest = hashlib.sha256(json.dumps(agreed, sort_keys=True).encode()).hexdigest()
        return f"{self.run_id}_{digest[:12]}"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "run config") -> RunConfig:
        config = _build(cls, data, source, prefix="")
        if "diloco" in data and config.training.mode != "diloco":
            raise RunConfigError(
                f'{source}: [diloco] is only for training.mode = "diloco" '
                f"(this run's mode is {config.training.mode!r})"
            )
        config.validate(source)
        return config

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunConfigError(f"{path}: no such file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise RunConfigError(f"{path}: not valid TOML ({error})") from None
        return cls.from_dict(data, source=str(path))

    def validate(self, source: str = "run config") -> None:
        checks = [
            (
                "run_id",
                bool(self.run_id) and self.run_id.replace("-", "").replace("_", "").isalnum(),
                "letters, digits, '-' and '_' only",
            ),
            ("data.seq_len", self.data.seq_len >= 2, "at least 2"),
            ("data.num_shards", self.data.num_shards >= 1, "at least 1"),
            (
                "data.dataset",
                self.data.dataset is None or re.fullmatch("[0-9a-f]{64}", self.data.dataset) is not None,
                "the 64 lowercase hex digits of a manifest's SHA-256 (starling-data prepare prints it)",
            ),
            (
                "data.url",
                self.data.url is None or (self.data.dataset is not None and self.data.url.startswith(URL_SCHEMES)),
                "an http:// or https:// address, with data.dataset set",
            ),
            ("training.target_batch_size", self.training.target_batch_size >= 1, "at least 1"),
            ("training.lr", self.training.lr > 0, "positive"),
            (
                "training.betas",
                len(self.training.betas) == 2 and all(0 <= b < 1 for b in self.training.betas),
                "two numbers in [0, 1)",
            ),
            ("training.total_epochs", self.training.total_epochs >= 1, "at least 1"),
            ("training.warmup_epochs", 0 <= self.training.warmup_epochs, "non-negative"),
            ("training.max_grad_norm", self.training.max_grad_norm > 0, "positive"),
            ("diloco.inner_batch_size", self.diloco.inner_batch_size >= 1, "at least 1"),
            (
                "diloco.samples_per_round",
                self.diloco.samples_per_round >= self.diloco.inner_batch_size,
                "at least diloco.inner_batch_size (one inner step)",
            ),
            ("diloco.outer_lr", 0 < self.diloco.outer_lr <= MAX_OUTER_LR, f"in (0, {MAX_OUTER_LR}]"),
            ("diloco.outer_momentum", 0 <= self.diloco.outer_momentum < 1, "in [0, 1)"),
            (
                "objective.teacher",
                self.objective.teacher is None or self.objective.kind == "distill",
                'set only when objective.kind = "distill"',
            ),
            (
                "objective.teacher_sha256",
                (self.objective.teacher_sha256 is not None) == (self.objective.kind == "distill")
                and (
                    self.objective.teacher_sha256 is None
                    or re.fullmatch("[0-9a-f]{64}", self.objective.teacher_sha256) is not None
                ),
                'the SHA-256 of the teacher\'s weights (64 lowercase hex digits), set when objective.kind = "distill"',
            ),
            ("objective.temperature", self.objective.temperature > 0, "positive"),
            ("objective.kl_weight", 0 <= self.objective.kl_weight <= 1, "in [0, 1]"),
            ("averaging.matchmaking_time", self.averaging.matchmaking_time > 0, "positive"),
            ("averaging.averaging_timeout", self.averaging.averaging_timeout > 0, "positive"),
            (
                "averaging.part_timeout",
                0 < self.averaging.part_timeout <= self.averaging.averaging_timeout,
                "positive and at most averaging.averaging_timeout",
            ),
            ("averaging.average_state_every", self.averaging.average_state_every >= 1, "at least 1"),
            (
                "averaging.target_group_size",
                self.averaging.target_group_size is None or self.averaging.target_group_size >= 2,
                "at least 2",
            ),
            ("averaging.group_key_bits", 0 <= self.averaging.group_key_bits <= 16, "in [0, 16]"),
            ("coordinator.checkpoint_every", self.coordinator.checkpoint_every >= 1, "at least 1"),
            ("coordinator.keep_checkpoints", self.coordinator.keep_checkpoints >= 1, "at least 1"),
            ("coordinator.poll_mbit", self.coordinator.poll_mbit > 0, "positive"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise RunConfigError(f"{source}: {key} must be {expected}")
        try:
            vocab_size = self.model_config().vocab_size
        except (ValueError, TypeError) as error:
            raise RunConfigError(f"{source}: [model] does not validate: {error}") from None
        if self.objective.kind == "sft" and vocab_size < CHAT_VOCAB:
            raise RunConfigError(
                f'{source}: objective.kind = "sft" needs a model of at least {CHAT_VOCAB} tokens (Mistral\'s '
                f"instruct vocabulary), [model] has {vocab_size}: set [model.overrides] vocab_size"
            )


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a TOML value fits a field's type annotation (ints are accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _expected(annotation: Any) -> str:
    """What a field of this type annotation takes, in words."""
    if typing.get_origin(annotation) is Literal:
        return f"one of {', '.join(typing.get_args(annotation))}"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise RunConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise RunConfigError(f"{source}: unknown key {prefix + key!r} (known: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = _build(annotation, value, source, prefix=f"{prefix}{key}.")
        elif not _matches(value, annotation):
            raise RunConfigError(
                f"{source}: {prefix}{key} must be {_expected(annotation)}, got {type(value).__name__} {value!r}"
            )
        elif annotation is float and not math.isfinite(value):
            raise RunConfigError(f"{source}: {prefix}{key} must be a finite number, got {value!r}")
        else:
            values[key] = float(value) if annotation is float else value
    return cls(**values)
