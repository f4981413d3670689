"""The coordinator: the run's first peer, its publisher, monitor, checkpointer and dashboard.

Training never depends on it: peers average among themselves, and the run record it publishes
stays in their DHT storage for an hour. When it comes back it picks up its history from SQLite and
its identity (hence its address) from the identity file in the state dir.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema
from hivemind.p2p import P2PDaemonError
from hivemind.utils import get_dht_time
from tqdm.auto import tqdm

from coordinator.checkpoints import Checkpoint, CheckpointStore
from coordinator.history import History, Point
from coordinator.initial_state import adopt_architecture, initial_state, load_pretrained
from coordinator.prometheus import registry_for
from coordinator.server import DashboardServer
from coordinator.state_sharing import CheckpointAverager
from coordinator.swarm import ONLINE_WITHIN, SwarmState, peer_kind, read_progress, received_bytes, summarize
from model import CausalLM, ModelConfig
from model.adapters import load_checkpoint
from model.evaluate import check_vocabulary, evaluate
from model.prepared import (
    MANIFEST,
    Manifest,
    PreparedDataError,
    is_prepared,
    load_manifest,
    load_prepared,
    manifest_digest,
    manifest_path,
)
from peer import metrics, run_record
from peer.dataset import DatasetError, fetch_manifest
from peer.events import EventLog
from peer.identity import check_multiaddrs, load_or_create_identity
from peer.progress import SUMMARY_FROM_PEERS, ProgressSummary, ProgressSummarySchema, summary_expiration, summary_key
from peer.run_config import RunConfig
from peer.version import VERSION

logger = logging.getLogger("starling.coordinator")

POLL_PERIOD = 1.0  # seconds between two reads of the swarm's records, at least
HISTORY_PERIOD = 5.0  # seconds between two points of the time series
STATE_DOWNLOAD_TIMEOUT = 60.0
KNOWN_PEERS = "known_peers.json"  # addresses of peers last seen online, to rejoin the swarm after a restart


def poll_wait(download_bytes: int, poll_seconds: float, poll_mbit: float) -> float:
    """Seconds from the end of a poll that took `poll_seconds` and downloaded `download_bytes` to the
    next: POLL_PERIOD, or longer where polling that often would download more than `poll_mbit` on
    average (coordinator.poll_mbit). A poll reads both records in full from every node that holds
    them (hivemind's reads with latest=True ask up to 20 nodes: 5 replicas, then copies cached
    by readers), so its download grows with the swarm."""
    return max(POLL_PERIOD, download_bytes * 8 / (poll_mbit * 1e6) - poll_seconds)


class CoordinatorError(RuntimeError):
    """The coordinator cannot start: the message says what to check."""


@dataclass
class CoordinatorOptions:
    config: str
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/31337"])
    announce_maddrs: list[str] = field(default_factory=list)
    identity: str | None = None  # default: <state dir>/identity.key
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8080
    checkpoint_dir: str | None = None  # default: <state dir>/checkpoints
    state_dir: str | None = None  # default: runs/<run_id>
    events: str | None = None  # a JSON-lines file of what the coordinator does (see _emit)
    eval_data: str | None = None  # a prepared held-out dataset: each checkpoint's loss on it
    eval_sequences: int = 256  # of eval_data's sequences, the first ones


class Coordinator:
    """`Coordinator(CoordinatorOptions(config="run.toml")).run(duration=None)` until stopped."""

    def __init__(self, options: CoordinatorOptions) -> None:
        self.options = options
        check_multiaddrs("host_maddrs", options.host_maddrs)
        check_multiaddrs("announce_maddrs", options.announce_maddrs)
        self.run_config = RunConfig.load(options.config)
        self.state_dir = Path(options.state_dir or Path("runs") / self.run_config.run_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.identity_path = Path(options.identity or self.state_dir / "identity.key")
        self.key = load_or_create_identity(self.identity_path)
        self.checkpoints = CheckpointStore(
            options.checkpoint_dir or self.state_dir / "checkpoints", keep=self.run_config.coordinator.keep_checkpoints
        )
        if self.run_config.model.init_from:
            self._start_from_pretrained(self.run_config.model.init_from)
        self.latest_checkpoint = self.checkpoints.latest()  # kept here: the views ask for it on every request
        self.dataset = self._dataset()
        self.held_out = self._held_out()
        # the newest checkpoint's held-out evaluation, with its epoch (the dashboard's and /metrics')
        self.latest_evaluation = next(
            ({**c.evaluation, "epoch": c.epoch} for c in reversed(self.checkpoints.all()) if c.evaluation), None
        )
        self.checkpoint_error: str | None = None  # why the last checkpoint failed, until one succeeds
        self.history = History(self.state_dir / "history.sqlite3")
        points = self.history.points(limit=1)
        self.swarm = SwarmState(
            epoch=points[-1].epoch if points else 0, target_batch_size=self.run_config.samples_per_epoch
        )
        self.started_at = time.time()
        self._stop = threading.Event()
        self._checkpointing = threading.Lock()
        self._last_report_time: dict[str, float] = {}
        self.poll_seconds: float | None = None  # how long the latest look at the swarm's records took
        self.poll_download: int | None = None  # bytes its DHT node received meanwhile (None: not counted here)
        self.poll_wait = POLL_PERIOD  # seconds from the end of that look to the next (see poll_wait)
        self.polls = 0
        self.dht: hivemind.DHT | None = None
        self.averager: CheckpointAverager | None = None
        self.server: DashboardServer | None = None
        self.events = EventLog(options.events) if options.events else None
        with torch.device("meta"):
            self._parameters = list(CausalLM(self.run_config.model_config()).parameters())  # shapes only

    def _start_from_pretrained(self, path: str) -> None:
        """Adopt the pretrained model's architecture; on the run's first start, make its weights the
        checkpoint of epoch 0."""
        latest = self.checkpoints.latest()
        if latest is not None:  # the run went on from those weights: its checkpoints say the architecture
            adopt_architecture(self.run_config, ModelConfig.from_pretrained(latest.path))
            return
        logger.info("converting %s", path)
        pretrained = load_pretrained(path)
        adopt_architecture(self.run_config, pretrained.config)
        checkpoint = self.checkpoints.save(initial_state(pretrained, self.run_config), pretrained.config)
        logger.info("the run starts from %s (saved as %s)", path, checkpoint.path)

    def _dataset(self) -> Manifest | None:
        """The manifest of the run's prepared dataset, checked against the digest the run names: from
        [data] path, which this coordinator then serves, or from [data] url."""
        data = self.run_config.data
        if data.dataset is None:
            return None
        if data.url is not None:
            try:
                return fetch_manifest(data.url, data.dataset, self.state_dir / "dataset")
            except DatasetError as error:
                raise CoordinatorError(str(error)) from None
        if data.path is None or not is_prepared(data.path):
            raise CoordinatorError(
                f"data.path must be the prepared dataset's folder for this coordinator to serve "
                f"(or set data.url), got {data.path!r}"
            )
        if manifest_digest(data.path) != data.dataset:
            raise CoordinatorError(f"{manifest_path(data.path)}: its SHA-256 is not the run's data.dataset")
        try:
            manifest = load_manifest(data.path)
        except PreparedDataError as error:
            raise CoordinatorError(str(error)) from None
        objective = self.run_config.objective
        if manifest.teacher_targets is not None and objective.kind == "distill":
            try:
                objective.check_teacher_targets(manifest.teacher_targets, self.run_config.model_config().vocab_size)
            except ValueError as error:
                raise CoordinatorError(str(error)) from None
        return manifest

    def _held_out(self) -> tuple[Manifest, torch.Tensor] | None:
        """The held-out sequences each checkpoint is evaluated on (--eval-data), checked to fit the model."""
        if self.options.eval_data is None:
            return None
        where = f"eval_data {self.options.eval_data!r}"
        try:
            manifest, sequences = load_prepared(self.options.eval_data)
            check_vocabulary(manifest, self.run_config.model_config().vocab_size, where)
        except (PreparedDataError, ValueError, OSError) as error:
            raise CoordinatorError(str(error)) from None
        if manifest.chat != (self.run_config.objective.kind == "sft"):
            held = "conversations" if manifest.chat else "text"
            raise CoordinatorError(f"{where} holds {held}; the run trains on the other")
        return manifest, sequences[: self.options.eval_sequences]

    def _served_dataset(self) -> tuple[Path, frozenset[str]] | None:
        """The folder and file names the dashboard's server serves under /data/."""
        if self.dataset is None or self.run_config.data.url is not None:
            return None
        return Path(self.run_config.data.path), frozenset({MANIFEST, *(shard.file for shard in self.dataset.shards)})

    # ---- start -------------------------------------------------------------------------------

    def start(self) -> None:
        run_id = self.run_config.run_id
        try:
            self.server = DashboardServer(
                self.options.dashboard_host,
                self.options.dashboard_port,
                self.snapshot,
                self._history_points,
                registry_for(self.snapshot),
                dataset=self._served_dataset(),
            )
        except OSError as error:
            raise CoordinatorError(
                f"cannot serve the dashboard on {self.options.dashboard_host}:"
                f"{self.options.dashboard_port}: {error.strerror} (is another coordinator "
                "running? choose another --dashboard-port)"
            ) from None
        self.signer = RSASignatureValidator(self.key)
        validators = [
            self.signer,
            SchemaValidator(metrics.MetricsSchema, prefix=run_id),
            SchemaValidator(TrainingProgressSchema, prefix=self.run_config.training_key()),
            SchemaValidator(ProgressSummarySchema, prefix=self.run_config.training_key()),
        ]
        known = self._known_peers()  # peers seen before a restart are its way back into the swarm
        try:
            try:
                self.dht = self._start_dht(validators, known)
            except P2PDaemonError as error:
                if not known or "bootstrap" not in str(error):
                    raise
                logger.info("none of the %d peers seen before answered: starting a new swarm", len(known))
                self.dht = self._start_dht(validators, [])
        except P2PDaemonError as error:
            raise CoordinatorError(
                f"the DHT could not listen on {' '.join(self.options.host_maddrs)}: {str(error).splitlines()[-1]}"
            ) from None
        self.averager = CheckpointAverager(self.dht, self.run_config.training_key(), self._parameters)
        latest = self.latest_checkpoint
        if latest is not None:
            logger.info("serving checkpoint %s to peers that find no one else with state", latest.path)
            self.averager.serve(CheckpointStore.load(latest))
            self.swarm.epoch = max(self.swarm.epoch, latest.epoch)
        self._publish()
        self.server.start()
        logger.info("run %s: coordinator %s, dashboard %s", run_id, self.dht.peer_id, self.server.url)
        print(f"join this run with:\n  {self.join_command()}\ndashboard: {self.server.url}", flush=True)
        self._emit(
            "started", peer_id=str(self.dht.peer_id), initial_peers=self.initial_peers, dashboard=self.server.url
        )

    def _start_dht(self, validators: list, initial_peers: list[str]) -> hivemind.DHT:
        return hivemind.DHT(
            initial_peers=initial_peers,
            ensure_bootstrap_success=False,
            host_maddrs=self.options.host_maddrs,
            announce_maddrs=self.options.announce_maddrs or None,
            identity_path=str(self.identity_path),
            record_validators=validators,
            authorizer=self._authorizer(),
            start=True,
        )

    def _known_peers(self) -> list[str]:
        try:
            return json.loads((self.state_dir / KNOWN_PEERS).read_text())
        except (FileNotFoundError, ValueError):
            return []

    def _remember_peers(self, reports: list[metrics.PeerMetrics]) -> None:
        addresses = sorted({a for r in reports for a in r.addresses if "/p2p/" in a})
        if addresses and addresses != self._known_peers():
            temporary = self.state_dir / f".{KNOWN_PEERS}.tmp"
            temporary.write_text(json.dumps(addresses))
            os.replace(temporary, self.state_dir / KNOWN_PEERS)

    def _authorizer(self):
        if self.run_config.coordinator.auth != "token":
            return None
        from coordinator.revocations import RevocationList
        from peer.auth import RunAuthorizer, issue_token, parse_token

        grant = parse_token(issue_token(self.key, self.run_config.run_id, "coordinator", ttl_seconds=10 * 365 * 86400))
        return RunAuthorizer(grant, local_private_key=self.key, revoked=RevocationList(self.state_dir))

    @property
    def initial_peers(self) -> list[str]:
        return [str(address) for address in self.dht.get_visible_maddrs()]

    def join_command(self) -> str:
        command = "starling-peer --initial-peers " + " ".join(self.initial_peers)
        return command + (" --token TOKEN" if self.run_config.coordinator.auth == "token" else "")

    def _publish(self) -> None:
        services = {"peer_id": str(self.dht.peer_id), "version": VERSION}
        if self._served_dataset() is not None:
            services["data_url"] = self.server.url + "data/"
        stored = run_record.publish(self.dht, self.signer, self.run_config, services)
        self._published_at = time.monotonic()
        if not stored:
            logger.warning("the run record could not be stored in the DHT; retrying later")

    # ---- run ---------------------------------------------------------------------------------

    def run(self, duration: float | None = None) -> None:
        """Start, then watch the swarm until `duration` passes, stop() is called, SIGINT or SIGTERM."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        started = time.monotonic()
        try:
            self.start()
            last_point = 0.0
            while not self._stop.wait(self.poll_wait):
                if duration is not None and time.monotonic() - started >= duration:
                    break
                self.poll()
                if time.monotonic() - last_point >= HISTORY_PERIOD:
                    last_point = time.monotonic()
                    self._add_point()
                if time.monotonic() - self._published_at >= run_record.REPUBLISH_PERIOD:
                    self._publish()
                self._maybe_checkpoint()
        except KeyboardInterrupt:
            logger.info("interrupted: shutting down")
        finally:
            self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def poll(self) -> None:
        """Read the swarm's records and update the history and the current view."""
        run, now, began, received = self.run_config, time.time(), time.monotonic(), received_bytes(self.dht)
        progress = read_progress(self.dht, run.training_key())
        reports = metrics.read_all(self.dht, run.run_id)
        if received is not None and (now_received := received_bytes(self.dht)) is not None:
            self.poll_download = now_received - received
        for report in reports:
            if report.time > self._last_report_time.get(report.peer_id, 0.0):
                self._last_report_time[report.peer_id] = report.time
                self.history.record_sighting(
                    report.peer_id, report.name, peer_kind(report), report.device_name, report.samples_contributed, now
                )
        self._remember_peers([r for r in reports if now - r.time <= ONLINE_WITHIN])
        previous_epoch = self.swarm.epoch
        self.swarm = summarize(
            progress,
            reports,
            self.history.contributors(),
            run.samples_per_epoch,
            run.data.seq_len,
            self.swarm.epoch,
            now,
        )
        self.poll_seconds = time.monotonic() - began
        self.polls += 1
        self._pace_polls(len(reports))
        self._store_summary(progress)
        if self.swarm.epoch != previous_epoch:
            logger.info(
                "epoch %d: loss %s, %.1f samples/s, %d active peers",
                self.swarm.epoch,
                "n/a" if self.swarm.loss is None else f"{self.swarm.loss:.3f}",
                self.swarm.samples_per_second,
                self.swarm.active_peers["total"],
            )

    def _pace_polls(self, peers: int) -> None:
        """Set the wait before the next poll from this one's download (poll_wait); none is counted
        where the system does not count what the DHT node receives, and the polls go unpaced."""
        if self.poll_download is None:
            return
        wait = poll_wait(self.poll_download, self.poll_seconds, self.run_config.coordinator.poll_mbit)
        if (wait > POLL_PERIOD) != (self.poll_wait > POLL_PERIOD):
            logger.info(
                "%d peers' records, %.0f KB a poll: polling every %.1f s, within coordinator.poll_mbit = %g",
                peers,
                self.poll_download / 1000,
                wait + self.poll_seconds,
                self.run_config.coordinator.poll_mbit,
            )
        self.poll_wait = wait

    def _store_summary(self, progress: list[LocalTrainingProgress]) -> None:
        """Store the summary of the progress records just read, which peers of a swarm of
        SUMMARY_FROM_PEERS or more read instead of the records (peer.progress.RunProgressTracker);
        not waited for. A smaller swarm's peers read the records: it gets none. It lasts until
        SUMMARY_LIFETIME after the next is due: after the wait before the next poll and a poll as
        long as this one (peer.progress.summary_expiration)."""
        if len(progress) < SUMMARY_FROM_PEERS:
            return
        now = get_dht_time()
        self.dht.store(
            summary_key(self.run_config.training_key()),
            subkey=self.signer.local_public_key,
            value=ProgressSummary.of(progress, now).dict(),
            expiration_time=summary_expiration(next_due=now + self.poll_wait + self.poll_seconds),
            return_future=True,
        )

    def _add_point(self) -> None:
        s = self.swarm
        self.history.add_point(
            Point(time.time(), s.epoch, s.loss, s.samples_per_second, s.tokens_per_second, s.active_peers["total"])
        )

    # ---- checkpoints -------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        every = self.run_config.coordinator.checkpoint_every
        latest = self.latest_checkpoint
        due = (latest.epoch // every + 1) * every if latest else every
        if self.swarm.epoch >= due and self._checkpointing.acquire(blocking=False):
            threading.Thread(target=self._checkpoint, name="checkpoint", daemon=True).start()

    def _checkpoint(self) -> None:
        try:
            with tqdm(total=2, desc="checkpoint", unit="step", leave=False) as bar:
                bar.set_postfix_str("downloading state")
                started = time.perf_counter()
                state = self.averager.download(timeout=STATE_DOWNLOAD_TIMEOUT)
                download_seconds = time.perf_counter() - started
                bar.update()
                if state is None:
                    logger.warning("checkpoint skipped: no peer sent its state")
                    return
                bar.set_postfix_str(f"writing epoch {state.epoch}")
                started = time.perf_counter()
                checkpoint = self.checkpoints.save(state, self.run_config.model_config())
                self.latest_checkpoint, self.checkpoint_error = checkpoint, None
                bar.update()
            write_seconds = time.perf_counter() - started
            self.averager.serve(state)
            logger.info(
                "checkpoint of epoch %d written to %s (%.1f MB in %.1f s)",
                checkpoint.epoch,
                checkpoint.path,
                checkpoint.size_bytes / 1e6,
                write_seconds,
            )
            self._emit(
                "checkpoint",
                epoch=checkpoint.epoch,
                path=str(checkpoint.path),
                size_bytes=checkpoint.size_bytes,
                download_seconds=download_seconds,
                write_seconds=write_seconds,
            )
            if self.held_out is not None:
                self._evaluate(checkpoint)
        except Exception as error:  # a failed checkpoint must not stop the coordinator
            self.checkpoint_error = f"{type(error).__name__}: {error}"
            self._emit("checkpoint_failed", error=self.checkpoint_error)
            logger.error("checkpoint failed (training goes on, the previous checkpoint is kept): %s", error)
        finally:
            self._checkpointing.release()

    def _evaluate(self, checkpoint: Checkpoint) -> None:
        """The checkpoint's loss on the held-out set, as starling-eval measures it, kept beside it."""
        manifest, sequences = self.held_out
        try:
            started = time.perf_counter()
            result = evaluate(load_checkpoint(checkpoint.path), sequences, manifest.chat)
            evaluated = self.checkpoints.save_evaluation(checkpoint, result)
        except Exception as error:  # training goes on; the checkpoint stays, without its evaluation
            logger.error("evaluation of the checkpoint of epoch %d failed: %s", checkpoint.epoch, error)
            self._emit("evaluation_failed", epoch=checkpoint.epoch, error=f"{type(error).__name__}: {error}")
            return
        if self.latest_checkpoint is not None and self.latest_checkpoint.path == checkpoint.path:
            self.latest_checkpoint = evaluated
        self.latest_evaluation = {**result, "epoch": checkpoint.epoch}
        seconds = time.perf_counter() - started
        logger.info(
            "checkpoint of epoch %d: held-out loss %.4f (perplexity %.1f) in %.1f s",
            checkpoint.epoch,
            result["loss"],
            result["perplexity"],
            seconds,
        )
        self._emit("evaluation", epoch=checkpoint.epoch, path=str(checkpoint.path), seconds=seconds, **result)

    # ---- views -------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        """The run as served at /api/v1/state."""
        s, checkpoint, board = self.swarm, self.latest_checkpoint, self.history.leaderboard()
        return {
            "run_id": self.run_config.run_id,
            "mode": self.run_config.training.mode,
            "version": VERSION,
            "time": time.time(),
            "coordinator": {"peer_id": str(self.dht.peer_id) if self.dht else None, "started_at": self.started_at},
            "initial_peers": self.initial_peers if self.dht else [],
            "join_command": self.join_command() if self.dht else "",
            "epoch": s.epoch,
            "target_batch_size": s.target_batch_size,
            "samples_this_epoch": s.samples_this_epoch,
            "eta_seconds": s.eta_seconds,
            "loss": s.loss,
            "samples_per_second": s.samples_per_second,
            "tokens_per_second": s.tokens_per_second,
            "samples_total": sum(entry["samples"] for entry in board),
            "active_peers": s.active_peers,
            "rounds": s.rounds,
            "poll_seconds": self.poll_seconds,
            "poll_download_bytes": self.poll_download,
            "poll_wait_seconds": self.poll_wait,
            "polls": self.polls,
            "peers": s.peers,
            "leaderboard": board,
            "checkpoint": checkpoint.as_dict() if checkpoint else None,
            "checkpoint_error": self.checkpoint_error,
            "evaluation": self.latest_evaluation,
            "config": self.run_config.to_dict(),
            "dataset": self._dataset_view(sum(entry["samples"] for entry in board)),
        }

    def _dataset_view(self, samples_total: int) -> dict | None:
        """The run's prepared dataset as the dashboard shows it, with how often the swarm has gone through it."""
        if self.dataset is None:
            return None
        manifest = self.dataset
        return {
            "sha256": self.run_config.data.dataset,
            "url": self.run_config.data.url or (self.server.url + "data/" if self.server else None),
            "documents": manifest.documents,
            "tokens": manifest.tokens,
            "sequences": manifest.sequences,
            "shards": len(manifest.shards),
            "bytes": sum(shard.bytes for shard in manifest.shards),
            "passes": samples_total / max(1, manifest.sequences),
        }

    def _emit(self, event: str, **fields) -> None:
        """An event for harnesses and tools: "started" (peer_id, initial_peers, dashboard), "checkpoint"
        (epoch, path, size_bytes, download_seconds, write_seconds), "checkpoint_failed" (error),
        "evaluation" (epoch, path, seconds and model.evaluate.evaluate's loss, perplexity, tokens,
        sequences), "evaluation_failed" (epoch, error), "stopped"."""
        if self.events is not None:
            self.events.write(event, **fields)

    def _history_points(self, since: float) -> list[dict]:
        return [vars(point) for point in self.history.points(since=since)]

    # ---- shutdown ----------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.averager is not None:
            self.averager.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
        self.history.close()
        self._emit("stopped", epoch=self.swarm.epoch)
        if self.events is not None:
            self.events.close()
            self.events = None
