"""Peer: joins a run through the DHT and contributes gradients until told to stop."""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2PDaemonError
from tqdm.auto import tqdm

from model import CausalLM, ModelConfig
from model.chat import inputs_and_labels
from model.data import load_corpus
from model.kernels import guard as kernel_guard
from model.objectives import distillation_loss, load_teacher, top_k_distillation_loss
from model.prepared import is_prepared, manifest_digest, split_teacher_targets
from peer import memory_plan, metrics, run_record
from peer.auth import RunAuthorizer, check_grant_for, parse_token
from peer.averager import AggregatingAverager, CountingGradientAverager, RoundOutcome
from peer.dataset import RemoteDataset, default_cache
from peer.device import device_name, largest_micro_batch, resolve_device
from peer.diloco import DilocoOptimizer
from peer.events import EventLog
from peer.faults import FaultPlan
from peer.memory_plan import MemoryPlan
from peer.optimizer import make_collaborative_optimizer
from peer.options import PeerOptions
from peer.precision import AUTOCAST_DTYPES, MixedPrecision, choose_precision
from peer.run_config import RunConfig, RunConfigError
from peer.shards import CorpusShards, ShardReader, ShardSource
from peer.state_loading import state_offers
from peer.version import VERSION

logger = logging.getLogger("starling.peer")

AUXILIARY_POLL_PERIOD = 0.2  # seconds between two averaging checks of an auxiliary peer
PROGRESS_FETCH_TIMEOUT = 10.0  # seconds to wait for the swarm's progress before training
SHUTDOWN_GRACE = 2.0  # seconds a helper process gets to finish before it is terminated
GROUP_STATE_WAIT = 10.0  # seconds to wait for the state a group stepped to (it steps right after its round)
RESYNC_DELAY = 1.0  # seconds between two looks for a donor, the first after the epoch change that left the swarm
# A DHT start whose pings to the initial peers all went unanswered is tried this many times in all,
# waiting JOIN_RETRY_WAIT seconds before the second, twice that before the third, each wait drawn up to
# half longer: an initial peer busy with a burst of joiners (64 starting at once on one machine: one of
# them had no answer within hivemind's 3 s) answers the next ping, and the joiners no longer retry in step.
JOIN_ATTEMPTS = 3
JOIN_RETRY_WAIT = 2.0
EPOCH_TOLERANCE = 1  # epochs a peer that averaged since its last state load may lag its group and take their epoch


class PeerError(RuntimeError):
    """A peer cannot start: the message says what to check."""


class _Unanswered(Exception):
    """No initial peer answered the DHT node's ping (busy, or refusing this peer)."""


@dataclass
class PeerCallbacks:
    """Functions a harness, a notebook or a test gives a peer; each is called with the peer, in its
    training thread."""

    on_epoch: Callable[[Peer], None] | None = None  # an epoch ended (after the peer's own checks)
    # DiLoCo mode: the round's inner steps are over; the model holds this peer's local parameters,
    # about to become the pseudo-gradient (optimizer.grad_averager.local_samples_accumulated: its weight).
    on_round_end: Callable[[Peer], None] | None = None
    # The peer took another peer's state (on joining, after a partial round or to resynchronise):
    # optimizer.local_epoch is the state's epoch, the model holds its parameters.
    on_state_loaded: Callable[[Peer], None] | None = None


@dataclass
class PeerSummary:
    """What this peer did, returned by Peer.run."""

    peer_id: str
    epoch: int
    samples_contributed: int
    samples_skipped: int
    out_of_memory_errors: int  # micro-batches that ran out of device memory (each halved the micro-batch)
    precision: str  # what it trained in: bf16, fp16 (with loss scaling) or fp32
    fp16_overflows: int  # fp16 micro-batches skipped because their scaled gradients overflowed
    last_loss: float | None
    seconds: float
    compute_seconds: float  # of `seconds`, those spent in forward and backward of micro-batches
    bytes_sent: int  # of all-reduce messages: (pseudo-)gradient and state averaging parts and averages
    rounds_succeeded: int  # gradient rounds that averaged every value with the group
    rounds_partial: int  # ... that averaged only part of them (the rest stayed this peer's own)
    rounds_failed: int  # ... that averaged nothing
    inner_steps: int  # DiLoCo mode: local optimizer steps (0 in batch mode)
    partial_round_fractions: list[float]  # the fraction averaged in each partial round
    state_loads: int  # states loaded from other peers and applied
    resyncs: int  # of those, loads that brought this peer back after a partial or failed round
    # reads of the run's progress: "summary" (the coordinator's, in a swarm of 32 peers or more), "records"
    progress_reads: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def _stop_on_sigterm(stop: threading.Event):
    """A SIGTERM handler that asks this process's peer to stop. hivemind forks its DHT and averager
    processes after the handler is installed, and a forked process keeps it: there SIGTERM (their
    terminate() at shutdown) must still end the process, or our exit waits on them."""
    owner = os.getpid()

    def handle(signum: int, frame) -> None:
        if os.getpid() == owner:
            stop.set()
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle


class Peer:
    """A training peer. `Peer(initial_peers=[...], **options).run(duration=None, max_epochs=None)`."""

    def __init__(
        self,
        initial_peers: list[str] | tuple[str, ...] = (),
        callbacks: PeerCallbacks | None = None,
        faults: FaultPlan | None = None,
        **options,
    ) -> None:
        self.options = PeerOptions(initial_peers=list(initial_peers), **options)
        self.callbacks = callbacks or PeerCallbacks()
        self.faults = faults or FaultPlan()  # failures a test declares (peer.faults); none for a volunteer
        self.options.check()
        self.device = resolve_device(self.options.device)
        self.precision = MixedPrecision(
            choose_precision(self.options.precision, self.device), self.device, self.faults.initial_loss_scale
        )
        if not self.options.initial_peers and self.options.config is None:
            raise ValueError(
                "initial_peers: give the addresses the coordinator printed (or --config for an offline run)"
            )
        # Offline runs read the run from a file; otherwise it comes from the coordinator through the DHT.
        self.run_config = RunConfig.load(self.options.config) if self.options.config else None
        self.coordinator_info: dict = {}  # from the run record: where the coordinator's services are
        self.grant = parse_token(self.options.token) if self.options.token else None
        if self.grant is not None:
            check_grant_for(self.grant, self.options.initial_peers)
        self.dht: hivemind.DHT | None = None
        self.optimizer: hivemind.Optimizer | None = None
        self.model: CausalLM | None = None
        self.teacher: CausalLM | None = None  # objective.kind = "distill": frozen, beside the model
        self.teacher_targets: dict | None = None  # the data's teacher top-k, when its rows carry them
        self.prometheus = metrics.PrometheusMetrics.create()
        self.prometheus.precision.info({"precision": self.precision.precision})
        self._stop = threading.Event()
        self._metrics_server = None
        self._pending_publish = None
        self._swarm_epoch = 0
        self._reported_rounds = {outcome: 0 for outcome in RoundOutcome}
        self._reported_overflows = 0
        self._reported_bytes = 0
        self._state_loads_at_last_round = 0  # state_loads when this peer's latest round ended
        self._training_started = time.perf_counter()  # reset when the training loop starts
        self.off_swarm = False  # a partial or failed round left this peer's parameters off the swarm's
        self._resync_after = 0.0  # time.monotonic() after which an off-swarm peer looks for a donor again
        self.events = EventLog(self.options.events) if self.options.events else None
        self.resyncs = 0
        self.samples_per_second = 0.0

    # ---- set-up -----------------------------------------------------------------------------

    def _start_dht(self) -> None:
        self.signer = RSASignatureValidator()
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            try:
                self.dht = self._try_dht(last=attempt == JOIN_ATTEMPTS)
                break
            except _Unanswered:
                wait = JOIN_RETRY_WAIT * 2 ** (attempt - 1) * (1 + random.random() / 2)
                logger.info("the initial peers did not answer; trying again in %.1f s", wait)
                self._emit("join_retry", attempt=attempt, wait=wait)
                self._stop.wait(wait)  # a stop cuts it short; the peer then stops before it trains
        self.peer_id = str(self.dht.peer_id)
        self._addresses = [str(a) for a in self.dht.get_visible_maddrs()]
        logger.info(
            "joined the DHT as %s; others can join with --initial-peers %s",
            self.peer_id,
            " ".join(self._addresses),
        )

    def _try_dht(self, last: bool) -> hivemind.DHT:
        """This peer's DHT node, started; _Unanswered when no initial peer answered its ping, unless
        this is the `last` try (then a PeerError saying what to check)."""
        try:
            return hivemind.DHT(
                initial_peers=self.options.initial_peers,
                host_maddrs=self.options.host_maddrs,
                announce_maddrs=self.options.announce_maddrs or None,
                client_mode=self.options.client_mode,
                identity_path=self.options.identity,
                record_validators=[self.signer],
                authorizer=RunAuthorizer(self.grant) if self.grant else None,
                start=True,
            )
        except P2PDaemonError as error:
            if "bootstrap" in str(error):
                tried = ", ".join(self.options.initial_peers)
                raise PeerError(
                    f"none of the initial peers answered (tried {tried}); check that the coordinator is running "
                    "and that these addresses are reachable from this machine"
                ) from None
            raise PeerError(f"the DHT could not start: {str(error).splitlines()[-1]}") from None
        except RuntimeError as error:
            if "bootstrap failed" not in str(error):
                raise
            if not last:
                raise _Unanswered from None
            # A refusal (the run's authorizer) and a ping unanswered in time look the same from here.
            hint = "check that your --token is current" if self.grant else "if the run is moderated, pass --token"
            raise PeerError(
                f"the initial peers ({', '.join(self.options.initial_peers)}) did not accept this peer in "
                f"{JOIN_ATTEMPTS} tries (busy, or refusing it): {hint}"
            ) from None

    def _join_run(self) -> None:
        """Read the run's configuration from the coordinator's signed record, unless given a file."""
        if self.run_config is None:
            try:
                self.run_config, self.coordinator_info = run_record.fetch(self.dht, self.options.initial_peers)
            except run_record.RunRecordMissing as error:
                hint = "" if self.grant else " If the run is moderated, ask its organiser for a --token."
                raise PeerError(f"{error}.{hint}") from None
            logger.info("joined run %s", self.run_config.run_id)
        self.dht.add_validators([metrics.schema_validator(self.run_config.run_id)])

    def plan(self) -> MemoryPlan:
        """What the run's model needs on this peer's device (peer.memory_plan). The run comes from
        the config file, or from the coordinator's record through the DHT, which the peer then leaves."""
        if self.run_config is None:
            self._start_dht()
            try:
                self._join_run()
            finally:
                self.dht.shutdown()
        try:
            return memory_plan.plan(
                self.run_config,
                self.device,
                self.precision.precision,
                self._device_memory(),
                distill_from=self._distill_from(),
            )
        except ValueError as error:  # the teacher's folder is not a checkpoint
            raise PeerError(f"objective.teacher: {error}") from None

    def _distill_from(self) -> str | None:
        """What this peer will distill from, for its memory plan: None (it does not distill), "top-k"
        (targets in its data, or no teacher named) or "teacher". Before the data is known (a plan
        alone), a named teacher counts."""
        objective = self.run_config.objective
        if objective.kind != "distill" or self.options.auxiliary:
            return None
        return "top-k" if self.teacher_targets is not None or objective.teacher is None else "teacher"

    def _device_memory(self) -> int | None:
        gigabytes = self.options.device_memory_gb
        return None if gigabytes is None else int(gigabytes * memory_plan.GIB)

    def _check_memory(self) -> MemoryPlan | None:
        """The memory plan where the device's memory is known (a GPU, or declared), logged; a
        PeerError, before the model is built, when not even one sequence fits."""
        if self.options.auxiliary or (self.device.type != "cuda" and self.options.device_memory_gb is None):
            return None
        found = self.plan()
        if not found.fits:
            raise PeerError(
                f"the run's model does not fit on {found.device}: it needs {memory_plan.mib(found.peak(1))} for one "
                f"sequence, {memory_plan.mib(int(memory_plan.SAFETY * found.device_memory))} is usable; this machine "
                "can still help as --auxiliary (averaging without training), or in a run of a smaller model"
            )
        logger.info("memory plan: %s", "; ".join(found.lines()))
        return found

    def _build_model(self) -> None:
        run = self.run_config
        self.shards = self._training_shards()
        self.reader = ShardReader(self.shards, self.peer_id)
        self.teacher_targets = self.shards.teacher_targets
        self.memory_plan = self._check_memory()
        torch.manual_seed(run.training.seed)  # every peer starts from the same weights
        config = run.model_config()
        if self.faults.model_overrides:
            config = ModelConfig.from_dict({**config.to_dict(), **self.faults.model_overrides})
        self.model = CausalLM(config).to(self.device)
        if run.objective.kind == "distill" and not self.options.auxiliary:  # an auxiliary peer does not train
            if self.teacher_targets is not None:
                self._check_teacher_targets()
            else:
                self.teacher = self._load_teacher()
        if self.options.auxiliary:
            self.micro_batch = 0
        elif self.options.batch_size == "auto":
            self.micro_batch = largest_micro_batch(self.model, run.data.seq_len, self.device, self.precision)
            if self.memory_plan is not None:  # the trial does not see the optimizer and averagers yet
                self.micro_batch = min(self.micro_batch, self.memory_plan.micro_batch)
        else:
            self.micro_batch = int(self.options.batch_size)

    def _load_teacher(self) -> CausalLM:
        """The run's teacher (objective.teacher), frozen on this peer's device, once its weights file
        is checked against the run's digest; a PeerError naming what is wrong otherwise."""
        objective = self.run_config.objective
        if objective.teacher is None:
            raise PeerError(
                "objective.teacher is not set and the run's data carries no teacher targets "
                "(starling-data teacher-targets): this peer has nothing to distill from"
            )
        try:
            teacher, _ = load_teacher(objective.teacher, objective.teacher_sha256)
        except ValueError as error:
            raise PeerError(f"objective.teacher: {error}") from None
        if teacher.config.vocab_size != self.model.config.vocab_size:
            raise PeerError(
                f"objective.teacher: its vocabulary has {teacher.config.vocab_size} tokens, "
                f"the run's model {self.model.config.vocab_size}"
            )
        logger.info(
            "distilling from the teacher in %s (%s parameters)",
            objective.teacher,
            f"{sum(p.numel() for p in teacher.parameters()):,}",
        )
        # Frozen, it needs no float32 master copy: on a GPU it is held in the precision it runs in.
        return teacher.to(self.device, AUTOCAST_DTYPES.get(self.precision.precision, torch.float32))

    def _check_teacher_targets(self) -> None:
        try:
            self.run_config.objective.check_teacher_targets(self.teacher_targets, self.model.config.vocab_size)
        except ValueError as error:
            raise PeerError(str(error)) from None
        logger.info("distilling from the teacher's top-%d log-probs in the data", self.teacher_targets["top_k"])

    def _training_shards(self) -> ShardSource:
        """The data this peer trains on: --data (offline), else the run's prepared dataset as it
        downloads it, else the run's corpus."""
        run, data = self.run_config, self.options.data
        if data is not None and run.data.dataset is not None and is_prepared(data):
            if manifest_digest(data) != run.data.dataset:
                raise PeerError(f"--data {data}: its manifest is not the run's dataset (SHA-256 {run.data.dataset})")
        if data is None and run.data.dataset is not None:
            url = run.data.url or self._coordinator_data_url()
            cache = Path(self.options.data_cache) if self.options.data_cache else default_cache()
            return RemoteDataset(
                url, run.data.dataset, run.data.seq_len, cache, self.options.data_cache_mb << 20, chat=self.chat
            )
        corpus = load_corpus(
            data or run.data.path,
            seq_len=run.data.seq_len,
            seed=run.training.seed,
            chat=self.chat,
            with_teacher_targets=True,
        )
        return CorpusShards(corpus, run.data.num_shards)

    def _coordinator_services(self, timeout: float) -> dict:
        """Where the coordinator's services are (its peer id, its data URL), from its run record:
        read at the join, or now, within `timeout` seconds, for a peer given --config; {} when no
        initial peer publishes a record this peer can read."""
        if not self.coordinator_info and self.options.initial_peers:
            try:
                _, self.coordinator_info = run_record.fetch(self.dht, self.options.initial_peers, timeout)
            except (run_record.RunRecordMissing, RunConfigError):
                pass
        return self.coordinator_info

    def _coordinator_data_url(self) -> str:
        """Where the coordinator serves the run's dataset (also looked up for a peer given --config)."""
        if "data_url" not in self._coordinator_services(timeout=run_record.FETCH_TIMEOUT):
            raise PeerError(
                "the run's dataset has no [data] url and no coordinator serves it: "
                "pass --data with a copy of it, or join through the coordinator"
            )
        return self.coordinator_info["data_url"]

    def _start_optimizer(self) -> None:
        self.optimizer = make_collaborative_optimizer(
            self.model,
            self.dht,
            self.run_config,
            self.micro_batch or None,
            auxiliary=self.options.auxiliary,
            faults=self.faults,
        )
        self.optimizer.on_state_refused = lambda donor, problem: self._emit(
            "state_refused", donor=donor, problem=problem
        )
        if isinstance(self.optimizer, DilocoOptimizer) and self.callbacks.on_round_end is not None:
            self.optimizer.before_outer_step = lambda: self.callbacks.on_round_end(self)
        tracker = self.optimizer.tracker
        tracker.read_summaries_from(self._coordinator_services(timeout=0).get("peer_id"))
        tracker.fetched_global_progress_this_epoch.wait(timeout=PROGRESS_FETCH_TIMEOUT)
        if tracker.global_epoch > self.optimizer.local_epoch or self._newer_state_offered():
            self.load_state_from_peers()

    def _newer_state_offered(self) -> bool:
        """Whether someone offers state of a later epoch than ours: a peer, or the coordinator with
        the latest checkpoint when the whole swarm restarts."""
        offers = state_offers(self.dht, self.optimizer.state_averager.prefix)
        return any(epoch > self.optimizer.local_epoch for epoch in offers.values())

    def load_state_from_peers(self, **limits) -> bool:
        """Fetch the current parameters, optimizer state and epoch from other peers (limits: see
        CheckedStateAverager.load_state_from_peers); returns whether a state was applied."""
        applied = self.optimizer.load_state_from_peers(**limits)  # the averager's process shows the download
        if applied:
            logger.info("loaded state from peers: epoch %d", self.optimizer.local_epoch)
            self._state_loaded(resync=False)
        else:
            logger.warning("loaded no state: no peer offered a state that fits this one")
        return applied

    @property
    def chat(self) -> bool:
        """Whether this peer fine-tunes on conversations (objective.kind = "sft"): its data holds
        them, and its loss falls on the assistant's tokens (model.chat)."""
        return self.run_config is not None and self.run_config.objective.kind == "sft"

    @property
    def teacher_variant(self) -> str:
        """What this peer distills from, as its metrics say: "" (it does not), "teacher" or "top-K"."""
        found = self._distill_from()
        if found == "top-k" and self.teacher_targets is not None:
            return f"top-{self.teacher_targets['top_k']}"
        return found or ""

    @property
    def state_loads(self) -> int:
        """States loaded from other peers and applied, by this peer or by hivemind's own catching up."""
        return self.optimizer.state_averager.states_received if self.optimizer is not None else 0

    @property
    def epoch(self) -> int:
        """The run's epoch as this peer knows it. An auxiliary peer's own epoch only moves when it
        takes part in a round, so it follows the swarm's progress."""
        if self.optimizer is None:
            return 0
        if self.options.auxiliary:
            return max(self._swarm_epoch, self.optimizer.local_epoch)
        return self.optimizer.local_epoch

    @property
    def inner_steps(self) -> int:
        """DiLoCo mode: the local optimizer steps this peer took (0 in batch mode)."""
        return getattr(self.optimizer, "inner_steps", 0)

    @property
    def _grad_averager(self) -> CountingGradientAverager | None:
        return getattr(self.optimizer, "grad_averager", None)

    @property
    def _averagers(self) -> list[AggregatingAverager]:
        """This peer's averagers (gradients or pseudo-gradients, and state), each in a process of its own."""
        if self.optimizer is None:
            return []
        averagers = (self._grad_averager, self.optimizer.state_averager)
        return [averager for averager in averagers if isinstance(averager, AggregatingAverager)]

    @property
    def bytes_sent(self) -> int:
        """Bytes of all-reduce messages this peer's averagers have sent (gradients or pseudo-gradients, and state)."""
        return sum(averager.bytes_sent for averager in self._averagers)

    @property
    def averager_kernel_fallbacks(self) -> int:
        """Kernels the averagers' processes replaced by their reference (the codec's encoder)."""
        return sum(averager.kernel_fallbacks for averager in self._averagers)

    # ---- the loop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running peer to finish its current step and shut down."""
        self._stop.set()

    def run(
        self,
        duration: float | None = None,
        max_epochs: int | None = None,
        start_line: Callable[[Peer], None] | None = None,
    ) -> PeerSummary:
        """Train until `duration` seconds pass, the run's epoch reaches `max_epochs`, stop() is
        called, or the process is interrupted (Ctrl-C, SIGTERM). Returns what this peer did.
        `start_line`, if given, is called once the peer has joined the run and loaded its state, just
        before it trains: a harness that starts several peers may wait there to start them together
        (the duration then counts from there)."""
        started = time.perf_counter()
        previous_sigterm = previous_sigint = None
        if threading.current_thread() is threading.main_thread():
            previous_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm(self._stop))
            previous_sigint = signal.getsignal(signal.SIGINT)
        self.samples_contributed = self.samples_skipped = 0
        self.out_of_memory_errors = 0
        self.compute_seconds = 0.0
        self.last_loss = None
        self._epoch_losses: list[float] = []  # of the micro-batches contributed since the last epoch
        self._step_seconds = 0.0  # of the last optimizer step (all-reduce and update at an epoch's end)
        try:
            self._start_dht()
            self._join_run()
            self._build_model()
            self._start_optimizer()
            self._emit(
                "joined",
                peer_id=self.peer_id,
                run_id=self.run_config.run_id,
                epoch=self.epoch,
                addresses=self._addresses,
            )
            threading.Thread(target=self._leave_matchmaking_on_stop, name="starling-stop", daemon=True).start()
            if start_line is not None:
                start_line(self)
                started = time.perf_counter()  # the duration counts from the start line
            if previous_sigint is not None:  # hivemind's averagers ignore SIGINT: Ctrl-C must still stop us
                signal.signal(signal.SIGINT, previous_sigint)
            if self.options.metrics_port is not None:
                self._metrics_server, _ = self.prometheus.serve(self.options.metrics_port, self.options.metrics_host)
            self._loop(started, duration, max_epochs)
        except KeyboardInterrupt:
            logger.info("interrupted: shutting down")
        finally:
            self._shutdown()
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
                signal.signal(signal.SIGINT, previous_sigint)
        summary = self.summary(started)
        self._emit("stopped", **summary.as_dict())
        if self.events is not None:
            self.events.close()
        return summary

    def _leave_matchmaking_on_stop(self) -> None:
        """Once asked to stop, cancel the matchmaking the training loop may be waiting on."""
        self._stop.wait()
        self.optimizer.leave_matchmaking()

    def _emit(self, event: str, **fields) -> None:
        if self.events is not None:
            self.events.write(event, **fields)

    def _state_loaded(self, resync: bool) -> None:
        """This peer took another peer's state: its event, then its callback."""
        self._emit("state_loaded", epoch=self.optimizer.local_epoch, resync=resync)
        if self.callbacks.on_state_loaded is not None:
            self.callbacks.on_state_loaded(self)

    def _loop(self, started: float, duration: float | None, max_epochs: int | None) -> None:
        self._training_started = started
        opt = self.optimizer
        last_publish = 0.0
        window_started, window_samples = time.perf_counter(), 0
        with tqdm(desc="training", unit="sample", dynamic_ncols=True) as bar:
            while not self._stop.is_set():
                if duration is not None and time.perf_counter() - started >= duration:
                    break
                if max_epochs is not None and self.epoch >= max_epochs:
                    break
                epoch = opt.local_epoch
                if self.options.auxiliary:
                    opt.step()
                    # The swarm's epoch as last seen: it must not go back when the trainers leave first.
                    self._swarm_epoch = max(self._swarm_epoch, opt.tracker.global_epoch)
                    time.sleep(AUXILIARY_POLL_PERIOD)
                else:
                    contributed = self._train_micro_batch(epoch)
                    window_samples += contributed
                    bar.update(contributed)
                if opt.local_epoch != epoch:
                    self._after_epoch()
                if self.off_swarm and not self.options.auxiliary:
                    self._maybe_resynchronise()
                # The metrics record goes out as often as the progress record (a share of an epoch).
                now, publish_period = time.perf_counter(), opt.tracker.record_period
                if now - window_started >= publish_period:
                    self.samples_per_second = window_samples / (now - window_started)
                    window_started, window_samples = now, 0
                if now - last_publish >= publish_period:
                    last_publish = now
                    self._report()
                    bar.set_postfix(epoch=opt.local_epoch, loss=self.last_loss, refresh=False)

    def _train_micro_batch(self, epoch: int) -> int:
        """Forward and backward on one micro-batch; contribute it if loss and gradients are finite.
        Out of device memory, the micro-batch is halved and nothing of it is contributed."""
        computing = time.perf_counter()
        batch = self.reader.next_batch(epoch, self.micro_batch).to(self.device)
        try:
            loss = self._forward_backward(batch)
        except torch.OutOfMemoryError:
            loss = None  # handled out here, where the failed pass's tensors are released
        if loss is None:
            self._halve_micro_batch(epoch)
            return 0
        self.compute_seconds += time.perf_counter() - computing
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        self.precision.unscale(grads)  # what enters the accumulators, and so the codec, is the true gradient
        finite_loss = bool(torch.isfinite(loss))
        finite = finite_loss and bool(torch.stack([g.isfinite().all() for g in grads]).all())
        self.precision.update(overflowed=finite_loss and not finite)
        contributed = 0
        if finite:
            self.last_loss = loss.item()
            self._epoch_losses.append(self.last_loss)
            stepping = time.perf_counter()
            self.optimizer.step(batch_size=self.micro_batch)
            self._step_seconds = time.perf_counter() - stepping
            self.samples_contributed += self.micro_batch
            self.prometheus.samples.inc(self.micro_batch)
            self.prometheus.loss.set(self.last_loss)
            contributed = self.micro_batch
        else:
            self.samples_skipped += self.micro_batch
            if not (finite_loss and self.precision.scaling):  # an fp16 overflow only lowers the loss scale
                logger.warning("non-finite loss or gradient at epoch %d: this micro-batch is not contributed", epoch)
        self.optimizer.zero_grad()
        return contributed

    def _forward_backward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.faults.slow_forward:
            time.sleep(self.faults.slow_forward)
        self.faults.check_memory(len(batch))
        objective = self.run_config.objective
        if self.teacher_targets is not None:
            batch, top_ids, top_log_probs = split_teacher_targets(
                batch, self.run_config.data.seq_len, self.teacher_targets["top_k"]
            )
        inputs, labels = inputs_and_labels(batch) if self.chat else (batch, batch)
        with self.precision.autocast():
            if objective.kind != "distill":
                loss = self.model(inputs, labels=labels).loss
            elif self.teacher_targets is not None:
                loss = top_k_distillation_loss(
                    self.model(batch).logits, top_ids, top_log_probs, batch, objective.temperature, objective.kl_weight
                )
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(batch).logits
                loss = distillation_loss(
                    self.model(batch).logits, teacher_logits, batch, objective.temperature, objective.kl_weight
                )
        self.precision.backward(loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the kernels are queued: wait for them to time them
        return loss

    def _halve_micro_batch(self, epoch: int) -> None:
        """After an out-of-memory error: drop the failed pass's gradients and the allocator's cache,
        and go on with half as many sequences per micro-batch, starting with the same ones."""
        failed = self.micro_batch
        self.optimizer.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.reader.put_back(failed)
        if failed == 1:
            raise PeerError(
                f"{device_name(self.device)} ran out of memory training one sequence of this run's model: "
                "join with --auxiliary (averaging only) or free the device's memory"
            )
        self.micro_batch = failed // 2
        self.out_of_memory_errors += 1
        self.prometheus.out_of_memory.inc()
        self._emit("out_of_memory", epoch=epoch, micro_batch=self.micro_batch)
        logger.warning("out of memory with micro-batches of %d sequences: going on with %d", failed, self.micro_batch)

    def _after_epoch(self) -> None:
        """A collaborative step happened: reload state if our parameters went bad or off the swarm's."""
        averager = self._grad_averager
        outcomes = averager.settle_rounds() if isinstance(averager, CountingGradientAverager) else []
        missed_step = False  # the group stepped without this peer, and no one sent the state it stepped to
        if outcomes and not self.options.auxiliary:
            epochs = averager.take_round_epochs()
            behind = 0 if epochs is None else epochs.behind
            # A peer that loaded a state and whose first round after it was the group's next epoch
            # (a joiner, hivemind's matchmaking keys carry no epoch) missed that epoch's step: taking
            # the group's epoch number alone left it stepping differently from the others for good
            # (2 of 4 agreement runs), state averaging notwithstanding. A peer that has averaged
            # since only lags the count; loading state at every such lag kept a slow peer of short
            # epochs loading instead of training (the cut-off test), so it takes the epoch, unless
            # it is behind by more than one.
            just_loaded = self.state_loads != self._state_loads_at_last_round
            self._state_loads_at_last_round = self.state_loads
            # In DiLoCo mode any lag is a missed outer step: this peer's pseudo-gradient was taken
            # from older outer parameters than the group's, and its outer step leaves it that far off.
            missed_outer_step = behind > 0 and isinstance(self.optimizer, DilocoOptimizer)
            if behind > EPOCH_TOLERANCE or (behind > 0 and just_loaded) or missed_outer_step:
                logger.info("the group of the last round was %d epoch(s) ahead: loading its state", behind)
                missed_step = not self._load_group_state(epochs.group + 1)
                self._state_loads_at_last_round = self.state_loads
            elif epochs is not None:
                self.optimizer.catch_up_with_group(epochs.group + 1)
        state_rounds = self.optimizer.state_averager.settle_state_rounds()
        self._emit(
            "epoch",
            epoch=self.optimizer.local_epoch,
            rounds=[outcome.value for outcome in outcomes],
            round_problems=averager.take_round_problems() if isinstance(averager, CountingGradientAverager) else [],
            round_timings=[list(timing) for timing in averager.take_round_timings()]
            if isinstance(averager, CountingGradientAverager)
            else [],
            state_rounds=[[state.outcome.value, state.group_size] for state in state_rounds],
            off_swarm=self.off_swarm,
            state_loads=self.state_loads,
            group_states_taken=self.optimizer.state_averager.group_states_taken,
            inner_steps=self.inner_steps,
            samples_contributed=self.samples_contributed,
            train_loss=statistics.fmean(self._epoch_losses) if self._epoch_losses else None,
            micro_batches=len(self._epoch_losses),
            compute_seconds=self.compute_seconds,
            step_seconds=self._step_seconds,
            optimizer_steps=self._optimizer_steps(),
            learning_rate=self.optimizer.state_averager.optimizer.param_groups[0]["lr"],
        )
        self._epoch_losses = []
        if not all(bool(p.isfinite().all()) for p in self.model.parameters()):
            logger.warning("parameters became non-finite: reloading state from peers")
            self.load_state_from_peers()
        elif not self.options.auxiliary:  # an auxiliary peer averages gradients only: no parameters to be off
            self._resynchronise_after_bad_rounds(outcomes, [state.outcome for state in state_rounds], missed_step)
        self.prometheus.epoch.set(self.optimizer.local_epoch)
        if self.callbacks.on_epoch is not None:
            self.callbacks.on_epoch(self)
        logger.info(
            "epoch %d: loss %.3f, %d samples contributed so far",
            self.optimizer.local_epoch,
            float("nan") if self.last_loss is None else self.last_loss,
            self.samples_contributed,
        )

    def _load_group_state(self, epoch: int) -> bool:
        """Load the state of `epoch`, the one the group of the last round stepped to; returns whether
        a state was applied. Its peers may still be running that step: a load right away took the
        state of the epoch before, and left this peer a step behind again; so did a load that first
        went through the group's next round (as hivemind's load does), since the group stepped
        again. After GROUP_STATE_WAIT, any newer state will do."""
        epoch = max(epoch, self.optimizer.tag_along_scheduled_round() or 0)
        deadline = time.monotonic() + GROUP_STATE_WAIT
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.optimizer.load_state_from_peers(min_donor_priority=epoch - 1, min_epoch=epoch):
                logger.info("loaded the group's state: epoch %d", self.optimizer.local_epoch)
                self._state_loaded(resync=False)
                return True
            time.sleep(RESYNC_DELAY)
        return self.load_state_from_peers()

    def _optimizer_steps(self) -> int | None:
        """The step count in the shared optimizer's state (Adam's bias correction uses it; state
        averaging does not average it), or None before the first step."""
        optimizer = self.optimizer.state_averager.optimizer
        for group in optimizer.param_groups:
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if step is not None:
                    return int(step)
        return None

    def _resynchronise_after_bad_rounds(
        self, outcomes: list[RoundOutcome], state_outcomes: list[RoundOutcome], missed_step: bool
    ) -> None:
        """After a partial or failed gradient round this peer stepped on values the others did not
        average, and its parameters are off the swarm's; so are they when its group stepped without
        it and no one sent the state they stepped to (`missed_step`; hivemind then takes the run's
        epoch all the same). It then offers its state only after the peers of its epoch that are
        not, and loads the state of one of them (_maybe_resynchronise). When there is none (the
        whole group lost the same parts), a state averaging round that averages every value with a
        group brings them back together; one that does not leaves this peer off the swarm
        (`outcomes`: the gradient rounds, `state_outcomes`: the state averaging rounds that ended
        since the last epoch, which for a missed step may have ended before it)."""
        epoch = self.optimizer.local_epoch
        if self._stop.is_set():
            return  # the round was cancelled because this peer is leaving
        bad = [outcome.value for outcome in outcomes if outcome is not RoundOutcome.SUCCEEDED]
        if missed_step or bad:
            if not self.off_swarm:
                why = "the group stepped to it without this peer" if missed_step else f"a round was {bad[-1]}"
                logger.warning("epoch %d: %s; off the swarm's parameters until it resynchronises", epoch, why)
            self._set_off_swarm(True)
            self._resync_after = time.monotonic() + RESYNC_DELAY
        elif self.off_swarm and RoundOutcome.SUCCEEDED in state_outcomes:
            logger.info("back with the swarm: state averaged with the group before epoch %d", epoch)
            self._set_off_swarm(False)
        elif self.off_swarm and state_outcomes:
            logger.warning(
                "the state averaging round before epoch %d was %s: still off the swarm's parameters",
                epoch,
                state_outcomes[-1].value,
            )

    def _maybe_resynchronise(self) -> None:
        """Load the state of a peer of this epoch whose rounds succeeded, once one offers it. The
        others change epoch at about the same time as this peer and then offer their new state:
        looking right at this peer's own epoch change may find none yet."""
        if time.monotonic() < self._resync_after:
            return
        self._resync_after = time.monotonic() + RESYNC_DELAY
        epoch = self.optimizer.local_epoch
        offers = state_offers(self.dht, self.optimizer.state_averager.prefix)
        others = [priority for peer_id, priority in offers.items() if str(peer_id) != self.peer_id]
        if not others:
            self._set_off_swarm(False)  # alone: its parameters are the swarm's
        # A donor's offer names its epoch a DHT store late: with short epochs, the others' offers
        # of this peer's epoch appear only once they (and this peer) have moved on. Donors one
        # epoch behind are asked too; one whose state really is older is left before its tensors.
        elif max(others) >= epoch - 1 and self.optimizer.load_state_from_peers(min_donor_priority=epoch - 1):
            self.resyncs += 1
            self._state_loaded(resync=True)
            logger.info("resynchronised with the swarm: loaded the state of epoch %d", self.optimizer.local_epoch)
            self._set_off_swarm(False)

    def _set_off_swarm(self, off_swarm: bool) -> None:
        state_averager = self.optimizer.state_averager
        self.off_swarm = state_averager.off_swarm = off_swarm
        if not self.options.client_mode:  # client-mode peers offer no state
            state_averager.state_sharing_priority = self.optimizer.local_epoch

    def _report(self) -> None:
        """Update the Prometheus metrics and publish this peer's signed record."""
        rounds = self._rounds()
        for outcome, count in rounds.items():
            self.prometheus.rounds[outcome].inc(count - self._reported_rounds[outcome])
        self._reported_rounds = rounds
        self.prometheus.samples_per_second.set(self.samples_per_second)
        self.prometheus.kernel_fallbacks.set(len(kernel_guard.fallbacks()) + self.averager_kernel_fallbacks)
        self.prometheus.loss_scale.set(self.precision.loss_scale)
        bytes_sent = self.bytes_sent
        self.prometheus.bytes_sent.inc(bytes_sent - self._reported_bytes)
        self._reported_bytes = bytes_sent
        self.prometheus.fp16_overflows.inc(self.precision.overflows - self._reported_overflows)
        self._reported_overflows = self.precision.overflows
        seq_len = self.run_config.data.seq_len
        self._pending_publish = metrics.publish(
            self.dht,
            self.run_config.run_id,
            self.signer,
            metrics.PeerMetrics(
                peer_id=self.peer_id,
                name=self.options.name or self.peer_id[-8:],
                epoch=self.optimizer.local_epoch,
                loss=float(self.last_loss if self.last_loss is not None else float("nan")),
                samples_per_second=float(self.samples_per_second),
                tokens_per_second=float(self.samples_per_second * seq_len),
                samples_contributed=self.samples_contributed,
                device=self.device.type,
                device_name=device_name(self.device),
                precision=self.precision.precision,
                objective=self.run_config.objective.kind,
                teacher=self.teacher_variant,
                bytes_sent=bytes_sent,
                compute_seconds=self.compute_seconds,
                training_seconds=time.perf_counter() - self._training_started,
                micro_batch=self.micro_batch,
                client_mode=self.options.client_mode,
                auxiliary=self.options.auxiliary,
                version=VERSION,
                rounds_succeeded=rounds[RoundOutcome.SUCCEEDED],
                rounds_partial=rounds[RoundOutcome.PARTIAL],
                rounds_failed=rounds[RoundOutcome.FAILED],
                mode=self.run_config.training.mode,
                inner_steps=self.inner_steps,
                addresses=[] if self.options.client_mode else self._addresses,
                time=time.time(),
            ),
        )

    # ---- shutdown ----------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Leave the averaging group, stop the DHT, and make sure no helper process outlives us."""
        self._stop.set()  # also ends the stop watcher of a run that ended by its duration
        if self.optimizer is not None and self.dht is not None:
            self._report()  # the samples since the last report count too
        if self._pending_publish is not None:
            try:
                self._pending_publish.result(timeout=SHUTDOWN_GRACE)
            except Exception:
                pass  # the record simply expires
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.optimizer is not None:
            self.optimizer.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        for child in multiprocessing.active_children():
            child.join(timeout=SHUTDOWN_GRACE)
            if child.is_alive():
                child.terminate()

    def _rounds(self) -> dict[RoundOutcome, int]:
        """This peer's gradient rounds so far, by outcome."""
        averager = self._grad_averager
        if not isinstance(averager, CountingGradientAverager):
            return {outcome: 0 for outcome in RoundOutcome}
        return dict(averager.rounds)

    def summary(self, started: float) -> PeerSummary:
        if isinstance(self._grad_averager, CountingGradientAverager):
            self._grad_averager.settle_rounds()  # a round may have ended as the peer stopped
        rounds = self._rounds()
        return PeerSummary(
            peer_id=getattr(self, "peer_id", ""),
            epoch=self.epoch,
            samples_contributed=self.samples_contributed,
            samples_skipped=self.samples_skipped,
            out_of_memory_errors=self.out_of_memory_errors,
            precision=self.precision.precision,
            fp16_overflows=self.precision.overflows,
            last_loss=self.last_loss,
            seconds=time.perf_counter() - started,
            compute_seconds=self.compute_seconds,
            bytes_sent=self.bytes_sent,
            rounds_succeeded=rounds[RoundOutcome.SUCCEEDED],
            rounds_partial=rounds[RoundOutcome.PARTIAL],
            rounds_failed=rounds[RoundOutcome.FAILED],
            inner_steps=self.inner_steps,
            partial_round_fractions=list(getattr(self._grad_averager, "partial_fractions", [])),
            state_loads=self.state_loads,
            resyncs=self.resyncs,
            progress_reads=dict(self.optimizer.tracker.reads) if self.optimizer is not None else {},
        )
