"""What Starling relies on in hivemind beyond its public API, each checked to still be there.

hivemind is pinned (pyproject.toml), but Starling subclasses its averagers, optimizer and progress
tracker, overrides their underscore methods, patches two of its functions and reproduces some of
its record formats. An upgrade may rename or drop any of that, and the first symptom would be a
swarm that quietly stops averaging. CONTRACT lists each such reliance with the Starling modules
behind it, so that an upgrade fails here instead, one line per broken reliance:
- every underscore member of a hivemind module or class that Starling reads, writes, overrides or calls;
- every name Starling imports from an internal hivemind module (a path below hivemind's own packages
  such as hivemind.averaging or hivemind.utils), by that path (test_every_internal_import_is_listed);
- every method Starling overrides or function it patches, with the hivemind code that must still
  call it for the override or patch to take effect;
- the attributes hivemind's methods set on instances that Starling's subclasses use;
- the keys and formats Starling reproduces rather than calls.
Everything is checked in this process, on hivemind's classes and source: no DHT, no swarm.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
# Starling's code that uses hivemind: shipped, benchmarks, and the swarm tests' peer worker.
STARLING_CODE = ["peer", "coordinator", "model", "dashboards", "benchmarks", "tests/workers"]


@dataclass(frozen=True)
class Reliance:
    """One thing of hivemind's that Starling relies on."""

    member: str  # dotted path: a module, then attributes, e.g. "hivemind.averaging.partition.TensorPartReducer"
    users: str  # the Starling modules that rely on it
    params: tuple[str, ...] = ()  # parameters of a callable, fields of a message or model, keys of a dict
    attrs: tuple[str, ...] = ()  # of a class: attributes its methods set on instances
    called_from: tuple[str, ...] = ()  # hivemind functions that must still refer to the member by name
    source_has: tuple[str, ...] = ()  # text its source must still hold: a key or format Starling reproduces


ALLREDUCE = "hivemind.averaging.allreduce.AllReduceRunner"
AVERAGER = "hivemind.averaging.DecentralizedAverager"
CONTAINER = "hivemind.averaging.partition.TensorPartContainer"
REDUCER = "hivemind.averaging.partition.TensorPartReducer"
GRAD_AVERAGER = "hivemind.optim.grad_averager.GradientAverager"
STATE_AVERAGER = "hivemind.optim.state_averager.TrainingStateAverager"
TRACKER = "hivemind.optim.progress_tracker.ProgressTracker"
AUTHORIZER = "hivemind.utils.auth.TokenAuthorizerBase"
SERIALIZATION = "hivemind.compression.serialization"
SERVICER = "hivemind.p2p.ServicerBase"

CONTRACT = [
    # peer/averager.py runs the all-reduce itself: with the run's runner class, measuring what came back averaged.
    Reliance(
        f"{AVERAGER}._aggregate_with_group",
        "peer/averager.py, benchmarks/allreduce.py",
        params=("group_info", "min_vector_size"),
        called_from=(f"{AVERAGER}._step",),
    ),
    # StateRoundsAverager sees every state averaging round because TrainingStateAverager starts them
    # through the step below it (super().step), pre-scheduled or not.
    Reliance(
        f"{AVERAGER}.step",
        "peer/averager.py",
        params=("wait",),
        called_from=(f"{STATE_AVERAGER}._do", f"{STATE_AVERAGER}.schedule_step"),
    ),
    Reliance(
        f"{AVERAGER}._run_allreduce_inplace_",
        "peer/averager.py",
        params=("tensors", "group_info", "group_id"),
        called_from=(f"{AVERAGER}._aggregate_with_group",),
    ),
    Reliance(
        AVERAGER,
        "peer/averager.py",
        attrs=(
            "_p2p",
            "_running_groups",
            "_state_updated",
            "last_updated",
            "prefix",
            "_matchmaking",
        ),
    ),
    Reliance(
        ALLREDUCE,
        "peer/averager.py, peer/robust.py, peer/faults.py",
        params=("p2p", "servicer_type", "prefix", "tensors", "group_id", "ordered_peer_ids"),
        attrs=(
            "modes",
            "tensor_part_container",
            "tensor_part_reducer",
            "ordered_peer_ids",
            "peer_id",
            "sender_peer_ids",
            "weight",
            "parts_for_local_averaging",
        ),
    ),
    Reliance("hivemind.averaging.allreduce.AveragingMode.AUX", "peer/averager.py"),
    # peer/averager.py: the reducer side is counted (a peer sends what it owes before its averager
    # shuts down), failed reducers and dropped senders are reported.
    Reliance(
        f"{AVERAGER}.rpc_aggregate_part",
        "peer/averager.py",
        params=("stream", "context"),
    ),
    Reliance(f"{AVERAGER}._shutdown", "peer/averager.py", params=("timeout",), called_from=(f"{AVERAGER}.shutdown",)),
    Reliance(
        f"{AVERAGER}._step",
        "peer/averager.py",
        params=("step", "future_for_init"),
        called_from=(f"{AVERAGER}.step",),
    ),
    Reliance(
        f"{ALLREDUCE}._accumulate_parts_streaming",
        "peer/averager.py",
        params=("stream", "sender_index"),
        called_from=(f"{ALLREDUCE}.rpc_aggregate_part",),
    ),
    # peer/averager.py (SharedAverages) sends averages, not differences: the runner's outputs are what
    # its member registers as each part's result, a remote reducer's message as received and a failed
    # reducer's parts as the member's own values once the container stops returning deltas.
    Reliance(
        f"{ALLREDUCE}._communicate_with_peer",
        "peer/averager.py",
        params=("peer_id",),
        called_from=(f"{ALLREDUCE}.run",),
        source_has=("register_processed_part(peer_index, part_index, delta)",),
    ),
    Reliance(f"{ALLREDUCE}._ban_sender", "peer/averager.py", params=("peer_id",)),
    Reliance(
        f"{CONTAINER}.register_failed_reducer",
        "peer/averager.py",
        source_has=("torch.zeros_like(part_and_info[0]) if self.return_deltas else part_and_info[0]",),
    ),
    Reliance(CONTAINER, "peer/averager.py", attrs=("compression", "prefetch", "return_deltas")),
    Reliance(
        f"{REDUCER}.accumulate_part", "peer/averager.py", params=("sender_index", "part_index", "tensor_part", "weight")
    ),
    Reliance("hivemind.averaging.partition.BannedException", "peer/averager.py"),
    Reliance("hivemind.utils.asyncio.amap_in_executor", "peer/averager.py"),
    # peer/hivemind_fixes.py: followers ask leaders to hold them one request timeout longer;
    # peer/faults.py slows a leader's group assembly down.
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking.get_request_expiration_time",
        "peer/hivemind_fixes.py",
        called_from=("hivemind.averaging.matchmaking.Matchmaking._request_join_group",),
    ),
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking",
        "peer/hivemind_fixes.py, peer/faults.py",
        attrs=("request_timeout", "client_mode", "potential_leaders"),
    ),
    # A client-mode follower's requests expire when its search ends; the queue of would-be leaders is
    # read from the DHT at most once every LEADER_QUEUE_PERIOD (peer/hivemind_fixes.py).
    Reliance(
        "hivemind.averaging.matchmaking.PotentialLeaders",
        "peer/hivemind_fixes.py",
        attrs=(
            "search_end_time",
            "min_matchmaking_time",
            "max_assured_time",
            "leader_queue",
            "past_attempts",
            "peer_id",
            "running",
            "update_triggered",
            "update_finished",
        ),
    ),
    Reliance(
        "hivemind.averaging.matchmaking.PotentialLeaders._update_queue_periodically",
        "peer/hivemind_fixes.py",
        params=("key_manager",),
        called_from=("hivemind.averaging.matchmaking.PotentialLeaders.begin_search",),
    ),
    Reliance(
        "hivemind.averaging.key_manager.GroupKeyManager.get_averagers",
        "peer/hivemind_fixes.py",
        params=("group_key", "only_active"),
    ),
    Reliance("hivemind.averaging.key_manager.GroupKeyManager", "peer/hivemind_fixes.py", attrs=("current_key",)),
    Reliance("hivemind.utils.timed_storage.MAX_DHT_TIME_DISCREPANCY_SECONDS", "peer/hivemind_fixes.py"),
    # Moshpit averaging (averaging.group_key_bits): the run config gives each averager its first
    # key's bits, and hivemind moves each member of an assembled group to the key of its index.
    Reliance(AVERAGER, "peer/run_config.py", params=("initial_group_bits", "target_group_size")),
    # benchmarks/records.py declares peers under the gradient averagers' first key as it is named.
    Reliance(
        "hivemind.optim.optimizer.Optimizer._make_gradient_averager",
        "benchmarks/records.py",
        source_has=('prefix=f"{self.run_id}_grad_averager"',),
    ),
    Reliance(
        "hivemind.averaging.key_manager.GroupKeyManager.current_key",
        "benchmarks/records.py",
        source_has=('f"{self.prefix}.0b{self.group_bits}"',),
    ),
    Reliance(
        "hivemind.averaging.key_manager.GroupKeyManager.update_key_on_group_assembled",
        "peer/run_config.py",
        called_from=(
            "hivemind.averaging.matchmaking.Matchmaking.leader_assemble_group",
            "hivemind.averaging.matchmaking.Matchmaking.follower_assemble_group",
        ),
        source_has=("self.group_bits = (self.group_bits + new_bits)",),
    ),
    # The harness peer counts the requests its DHT node sends (coordinator/harness_peer.py).
    *(
        Reliance(f"hivemind.dht.protocol.DHTProtocol.{name}", "coordinator/harness_peer.py")
        for name in ("call_ping", "call_store", "call_find")
    ),
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking._check_reasons_to_reject",
        "peer/hivemind_fixes.py",
        source_has=("self.potential_leaders.declared_expiration_time > (request.expiration",),
    ),
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking.leader_assemble_group",
        "peer/faults.py",
        called_from=(
            "hivemind.averaging.matchmaking.Matchmaking.rpc_join_group",
            "hivemind.averaging.matchmaking.Matchmaking._request_join_potential_leaders",
        ),
    ),
    Reliance(
        CONTAINER,
        "peer/averager.py, peer/faults.py",
        attrs=("failed_size", "total_size", "_input_parts_by_peer"),
    ),
    Reliance(
        "hivemind.averaging.group_info.GroupInfo", "peer/averager.py", params=("group_id", "peer_ids", "gathered")
    ),
    # peer.averager.state_ranks reads each member's gathered data as DecentralizedAverager.step packs it.
    Reliance(
        f"{AVERAGER}.step",
        "peer/averager.py",
        source_has=("self.serializer.dumps([self.bandwidth, self.mode.value, user_data_for_gather])",),
    ),
    Reliance(STATE_AVERAGER + "._do", "peer/averager.py", source_has=("gather=self.local_epoch",)),
    # CheckedStateAverager.schedule_step replaces the epoch hivemind's optimizer pre-schedules a state round with.
    Reliance(
        STATE_AVERAGER + ".schedule_step",
        "peer/state_loading.py",
        params=("scheduled_time",),
        called_from=("hivemind.Optimizer._maybe_schedule_state_averaging",),
    ),
    Reliance(
        f"{GRAD_AVERAGER}.step",
        "peer/averager.py, peer/diloco.py",
        params=("wait", "reset_accumulators"),
        called_from=("hivemind.Optimizer._begin_averaging_gradients",),
    ),
    Reliance(
        f"{GRAD_AVERAGER}.load_state_from_peers",
        "peer/averager.py",
        params=("wait", "timeout"),
        called_from=("hivemind.Optimizer.load_state_from_peers",),
    ),
    Reliance("hivemind.utils.asyncio.as_aiter", "peer/averager.py, peer/hivemind_fixes.py"),
    Reliance("hivemind.utils.asyncio.achain", "peer/hivemind_fixes.py"),
    # peer/hivemind_fixes.py: a part of an unknown group waits for the member's search to register a
    # group or to end without one (its search's end and its step's end wake the wait).
    Reliance(
        AVERAGER,
        "peer/hivemind_fixes.py",
        attrs=("_running_groups", "_pending_groups_registered", "_matchmaking"),
    ),
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking.look_for_group",
        "peer/hivemind_fixes.py",
        params=("step",),
        called_from=(f"{AVERAGER}._step",),
    ),
    Reliance("hivemind.averaging.matchmaking.Matchmaking.is_looking_for_group", "peer/hivemind_fixes.py"),
    # peer/hivemind_fixes.py: a leader's join stream waits for the follower to close it after the last message.
    Reliance(
        "hivemind.averaging.matchmaking.Matchmaking.rpc_join_group",
        "peer/hivemind_fixes.py",
        params=("request", "context"),
        called_from=(f"{AVERAGER}.rpc_join_group",),
    ),
    Reliance(
        f"{AVERAGER}._step",
        "peer/hivemind_fixes.py",
        params=("step", "future_for_init"),
        called_from=(f"{AVERAGER}.step",),
    ),
    Reliance("hivemind.utils.asyncio.azip", "peer/averager.py"),
    Reliance("hivemind.utils.timed_storage.get_dht_time", "peer/averager.py, peer/auth.py, peer/hivemind_fixes.py"),
    # peer/faults.py breaks rounds on purpose (for the tests) through AllReduceRunner subclasses.
    Reliance(
        f"{ALLREDUCE}._communicate_with_peer",
        "peer/faults.py",
        params=("peer_id",),
        called_from=(f"{ALLREDUCE}.run",),
    ),
    Reliance(
        f"{ALLREDUCE}._generate_input_for_peer",
        "peer/faults.py",
        params=("peer_index",),
        called_from=(f"{ALLREDUCE}._communicate_with_peer",),
    ),
    Reliance(f"{CONTAINER}.register_failed_reducer", "peer/faults.py", params=("peer_index",)),
    # peer/robust.py swaps the reducer's accumulator for one that keeps every part (_PartCollector).
    Reliance(
        REDUCER,
        "peer/robust.py",
        params=("part_shapes", "num_senders"),
        attrs=("accumulator", "finished", "num_parts", "num_senders"),
    ),
    Reliance(
        f"{REDUCER}.reset_accumulators",
        "peer/robust.py",
        called_from=(f"{REDUCER}.__init__", f"{REDUCER}.check_current_part_finished"),
    ),
    Reliance(f"{REDUCER}.accumulate_part", "peer/robust.py", source_has=("self.accumulator.add_(",)),
    Reliance(f"{REDUCER}.check_current_part_finished", "peer/robust.py", source_has=("self.accumulator.div_(",)),
    # peer/hivemind_fixes.py replaces StepControl.cancel and initialize_optimizer_state_ (once patched, their
    # signatures are Starling's: not checked).
    Reliance("hivemind.averaging.control.StepControl.cancel", "peer/hivemind_fixes.py"),
    Reliance("hivemind.averaging.control.StepControl", "peer/hivemind_fixes.py", attrs=("_trigger", "_cancel")),
    Reliance("hivemind.utils.mpfuture.MPFuture.cancel", "peer/hivemind_fixes.py"),
    Reliance(
        "hivemind.optim.state_averager.initialize_optimizer_state_",
        "peer/hivemind_fixes.py, coordinator/initial_state.py",
        called_from=(f"{STATE_AVERAGER}._init_components",),
    ),  # looked up at call time: the patch applies
    # peer/hivemind_fixes.py runs the DHT process (DHT.run, patched) with its requests read through a
    # pipe that drops a request whose sender is gone; the class's source is hivemind's own loop.
    Reliance(
        "hivemind.dht.DHT",
        "peer/hivemind_fixes.py",
        attrs=("_inner_pipe",),
        source_has=(
            "self._inner_pipe.poll()",
            "method, args, kwargs = self._inner_pipe.recv()",
            "getattr(self, method)(*args, **kwargs)",
        ),
    ),
    Reliance("hivemind.dht.DHT.run", "peer/hivemind_fixes.py"),
    # peer/hivemind_fixes.py replaces torch's thread pool first thing in every averager's background thread,
    # and gives the loop it serves on (from switch_to_uvloop, as the averager module names it) a task
    # factory that holds the requests' tasks.
    Reliance(
        f"{AVERAGER}._run_internal",
        "peer/hivemind_fixes.py",
        source_has=("loop = switch_to_uvloop()", "asyncio.create_task(getattr(self, method)(*args, **kwargs))"),
    ),
    Reliance(
        "hivemind.averaging.averager.switch_to_uvloop",
        "peer/hivemind_fixes.py",
        called_from=(f"{AVERAGER}._run_internal",),
    ),
    # peer/hivemind_fixes.py: members close their part streams once every part is in; reducers wait for that.
    Reliance(
        "hivemind.averaging.allreduce.AllReduceRunner._get_peer_stub",
        "peer/hivemind_fixes.py, peer/faults.py",
        called_from=("hivemind.averaging.allreduce.AllReduceRunner._communicate_with_peer",),
    ),
    Reliance(
        "hivemind.averaging.allreduce.AllReduceRunner",
        "peer/hivemind_fixes.py",
        attrs=("tensor_part_container", "ordered_peer_ids"),
    ),
    Reliance(
        f"{AVERAGER}.rpc_aggregate_part", "peer/hivemind_fixes.py, peer/averager.py", params=("stream", "context")
    ),
    Reliance(AVERAGER, "peer/hivemind_fixes.py", attrs=("next_chunk_timeout",)),
    # peer/state_loading.py downloads state itself, donor by donor, under TrainingStateAverager's RPC names.
    Reliance(
        f"{AVERAGER}._load_state_from_peers",
        "peer/state_loading.py",
        params=("future", "timeout"),
        called_from=(f"{AVERAGER}.load_state_from_peers",),
    ),
    Reliance(
        f"{AVERAGER}.load_state_from_peers",
        "peer/state_loading.py, coordinator/state_sharing.py",
        params=("wait", "timeout"),
    ),
    Reliance(AVERAGER, "peer/state_loading.py", attrs=("_outer_pipe", "_p2p", "dht", "prefix", "next_chunk_timeout")),
    # refused_donors() sends a (method, args, kwargs) call through _outer_pipe
    Reliance(
        f"{AVERAGER}._run_internal",
        "peer/state_loading.py",
        source_has=("method, args, kwargs = self._inner_pipe.recv()", "getattr(self, method)(*args, **kwargs)"),
    ),
    # state_offers() reads the state offers under this key
    Reliance(
        f"{AVERAGER}._declare_for_download_periodically",
        "peer/state_loading.py, peer/peer.py",
        source_has=('.all_averagers"',),
    ),
    Reliance(f"{AVERAGER}.get_stub", "peer/state_loading.py", params=("p2p", "peer", "namespace")),
    Reliance(f"{AVERAGER}.rpc_download_state", "peer/state_loading.py"),
    Reliance(f"{AVERAGER}.serializer", "peer/state_loading.py"),
    Reliance(f"{AVERAGER}.request_timeout", "peer/state_loading.py"),
    Reliance(f"{AVERAGER}.state_sharing_priority.fset", "peer/state_loading.py"),
    Reliance(
        f"{STATE_AVERAGER}._get_handle_name",
        "peer/state_loading.py",
        params=("namespace", "method_name"),
        called_from=(f"{SERVICER}.add_p2p_handlers", f"{SERVICER}._make_rpc_caller"),
    ),
    Reliance(
        f"{SERVICER}._get_handle_name", "peer/state_loading.py, benchmarks/allreduce.py", source_has=("cls.__name__",)
    ),  # RPC names follow the class: the overrides keep them
    Reliance(
        f"{STATE_AVERAGER}.load_state_from_peers",
        "peer/state_loading.py",
        called_from=("hivemind.Optimizer.load_state_from_peers",),
        # CheckedStateAverager puts the averaged statistics back after hivemind's load_state_dict
        source_has=("load_optimizer_state(self.optimizer", "if not self.reuse_tensors:"),
    ),
    Reliance(
        STATE_AVERAGER,
        "peer/state_loading.py, peer/diloco.py",
        attrs=(
            "local_epoch",
            "optimizer",
            "extra_tensors",
            "main_parameters",
            "finished_averaging_round",
            "reuse_tensors",
            "opt_keys_for_averaging",
            "lock_optimizer",
        ),
    ),
    # CheckedStateAverager counts an epoch's optimizer step as run once the optimizer has stepped
    # (or _do gave up first): _do runs the step under lock_optimizer, one call at a time.
    Reliance(
        f"{STATE_AVERAGER}._do",
        "peer/state_loading.py",
        params=("wait_for_trigger", "optimizer_step"),
        called_from=(f"{STATE_AVERAGER}.step",),
        source_has=("with self.lock_optimizer:", "self.optimizer.step()"),
    ),
    Reliance(
        f"{STATE_AVERAGER}.__init__",
        "peer/state_loading.py",
        source_has=("ThreadPoolExecutor(max_workers=2 if self.delta_rule_averaging else 1)",),
    ),
    # check_state() reads this metadata; coordinator/state_sharing.py serves the same
    Reliance(
        f"{STATE_AVERAGER}.get_current_state",
        "peer/state_loading.py, coordinator/state_sharing.py",
        source_has=("epoch=self.local_epoch", "group_bits=", "optimizer_metadata=optimizer_metadata"),
    ),
    # optimizer_state_layout() flattens an optimizer's state the same way
    Reliance(
        "hivemind.optim.state_averager.dump_optimizer_state",
        "peer/state_loading.py, coordinator/initial_state.py",
        source_has=('dict(type="tensor", index=len(flat_tensors))', 'dict(type="value", value=elem)'),
    ),
    Reliance("hivemind.proto.averaging_pb2.DownloadRequest", "peer/state_loading.py"),
    Reliance("hivemind.proto.averaging_pb2.DownloadData", "peer/state_loading.py", params=("metadata", "tensor_part")),
    Reliance("hivemind.utils.asyncio.aiter_with_timeout", "peer/state_loading.py", params=("iterable", "timeout")),
    Reliance("hivemind.utils.nested.nested_flatten", "peer/state_loading.py"),
    Reliance(
        "hivemind.utils.timed_storage.ValueWithExpiration", "peer/state_loading.py", params=("value", "expiration_time")
    ),
    # peer/progress.py filters the swarm's progress records; coordinator/swarm.py reads them.
    Reliance(
        TRACKER,
        "peer/progress.py, peer/optimizer.py, peer/diloco.py, peer/peer.py",
        params=(
            "dht",
            "prefix",
            "target_batch_size",
            "client_mode",
            "status_loglevel",
            "start",
            "min_refresh_period",
            "max_refresh_period",
            "default_refresh_period",
        ),
        attrs=(
            "lock_global_progress",
            "global_progress",
            "fetched_global_progress_this_epoch",
            "local_progress",
            "metadata_expiration",
            "training_progress_key",
            "should_report_progress",
            "shutdown_complete",
            "min_refresh_period",
            "max_refresh_period",
            "prefix",
            "target_batch_size",
            "expected_drift_peers",
            "expected_drift_rate",
            "performance_ema",
            "global_state_updated",
            "shutdown_triggered",
        ),
    ),
    # peer/progress.py sets max_refresh_period after each epoch: the longest wait before the next read;
    # its summary of the records reproduces this method's sums, clipping and drift allowance.
    Reliance(
        f"{TRACKER}._parse_swarm_progress_data",
        "peer/progress.py",
        params=("metadata",),
        called_from=(f"{TRACKER}.__init__",),
        source_has=(
            "a_max=self.max_refresh_period",
            "total_samples_per_second = self.performance_ema.eps",
            "max(0.0, current_time - peer.time) * peer.samples_per_second",
            "max(num_peers + self.expected_drift_peers, num_peers * (1 + self.expected_drift_rate))",
            "if not peer.client_mode:",
        ),
    ),
    # peer/progress.py reads the run's progress from the coordinator's summary or every record.
    Reliance(
        f"{TRACKER}._progress_fetcher",
        "peer/progress.py",
        called_from=(f"{TRACKER}.run",),
        source_has=("self.global_state_updated.wait", "self.fetched_global_progress_this_epoch.set()"),
    ),
    Reliance(f"{TRACKER}.__init__", "coordinator/swarm.py", source_has=('f"{self.prefix}_progress"',)),
    # peer/progress.py holds back the reporter's wake-ups (HeldReports) to store fewer records.
    Reliance(
        f"{TRACKER}.report_local_progress",
        "peer/progress.py",
        params=("local_epoch", "samples_accumulated", "update_global_samples"),
        source_has=("self.should_report_progress.set()",),
    ),
    Reliance(f"{TRACKER}._progress_reporter", "peer/progress.py", source_has=("self.should_report_progress.wait",)),
    Reliance(
        f"{TRACKER}.shutdown", "peer/progress.py", params=("timeout",), source_has=("should_report_progress.set()",)
    ),
    Reliance(
        "hivemind.optim.progress_tracker.GlobalTrainingProgress",
        "peer/progress.py, peer/diloco.py",
        params=("samples_accumulated",),
    ),
    Reliance(
        "hivemind.optim.progress_tracker.LocalTrainingProgress",
        "peer/progress.py, coordinator/swarm.py",
        params=("peer_id", "epoch", "samples_accumulated", "samples_per_second"),
    ),
    Reliance(
        "hivemind.optim.progress_tracker.TrainingProgressSchema", "coordinator/coordinator.py", params=("progress",)
    ),
    # peer/optimizer.py and peer/diloco.py build hivemind.Optimizer's parts themselves and step differently.
    Reliance(
        "hivemind.Optimizer._make_state_averager", "peer/optimizer.py", called_from=("hivemind.Optimizer.__init__",)
    ),
    Reliance(
        "hivemind.Optimizer._make_progress_tracker",
        "peer/optimizer.py",
        params=("target_batch_size",),
        called_from=("hivemind.Optimizer.__init__",),
    ),
    Reliance(
        "hivemind.Optimizer._make_gradient_averager",
        "peer/optimizer.py, peer/diloco.py",
        params=("factory",),
        called_from=("hivemind.Optimizer.__init__",),
    ),
    # Every gradient round gathers the member's epoch (CountingGradientAverager.schedule_step), which
    # hivemind.Optimizer starts its rounds through, pre-scheduled or not; the round's result maps
    # each member to what it gathered.
    Reliance(
        f"{GRAD_AVERAGER}.schedule_step",
        "peer/averager.py",
        called_from=(f"{GRAD_AVERAGER}.step", "hivemind.Optimizer._maybe_schedule_gradient_averaging"),
    ),
    Reliance(f"{AVERAGER}.step", "peer/averager.py", params=("gather",)),
    # DiLoCo with overlap: hivemind's delayed step applies the previous round's outer step before the
    # next pseudo-gradient is taken, and loads it again when an all-reduce in the background failed.
    Reliance(
        f"{STATE_AVERAGER}.step",
        "peer/diloco.py, peer/state_loading.py",
        params=(
            "wait_for_delayed_updates",
            "delay_optimizer_step",
            "wait_for_trigger",
            "increment_epoch",
            "optimizer_step",
        ),
        called_from=("hivemind.Optimizer._update_global_epoch", "hivemind.Optimizer.load_state_from_peers"),
    ),
    Reliance(
        "hivemind.Optimizer._load_local_gradients_into_optimizer",
        "peer/diloco.py",
        called_from=("hivemind.Optimizer._average_gradients_and_load_into_optimizer",),
    ),
    Reliance(
        "hivemind.Optimizer._check_and_accumulate_gradients",
        "peer/diloco.py",
        params=("batch_size", "grad_scaler"),
        called_from=("hivemind.Optimizer.step",),
    ),
    Reliance(
        "hivemind.Optimizer._update_global_epoch",
        "peer/optimizer.py, peer/diloco.py",
        params=("grad_scaler",),
        called_from=("hivemind.Optimizer.step",),
    ),
    # peer/optimizer.py: a peer behind its gradient round's group takes the group's epoch before
    # hivemind decides from it whether the epoch ends with a state round.
    Reliance(
        "hivemind.Optimizer._average_gradients_and_load_into_optimizer",
        "peer/optimizer.py",
        params=("maybe_step_control",),
        called_from=("hivemind.Optimizer._update_global_epoch",),
        source_has=("maybe_step_control.result(self.averaging_timeout)",),
    ),
    Reliance(
        "hivemind.Optimizer._update_global_epoch",
        "peer/optimizer.py",
        source_has=("next_epoch = max(self.local_epoch + 1, self.tracker.global_epoch)",),
    ),
    Reliance(
        "hivemind.Optimizer",
        "peer/optimizer.py, peer/diloco.py, peer/peer.py",
        attrs=(
            "dht",
            "run_id",
            "matchmaking_time",
            "allreduce_timeout",
            "shutdown_timeout",
            "offload_optimizer",
            "status_loglevel",
            "next_chunk_timeout",
            "client_mode",
            "auxiliary",
            "scheduled_grads",
            "scheduled_state",
            "averaging_timeout",
            "tracker",
            "state_averager",
            "grad_averager",
            "delay_grad_averaging",
        ),
    ),
    Reliance("hivemind.averaging.control.AveragingStage.LOOKING_FOR_GROUP", "peer/optimizer.py"),
    Reliance("hivemind.averaging.control.AveragingStage.AWAITING_TRIGGER", "benchmarks/allreduce.py"),
    # peer/diloco.py: pseudo-gradients in the gradient averager, outer steps in the state averager.
    Reliance(
        GRAD_AVERAGER,
        "peer/diloco.py",
        params=("reuse_grad_buffers",),
        attrs=("parameters", "local_samples_accumulated", "local_times_accumulated", "_accumulators_used_in_step"),
    ),
    Reliance(
        f"{GRAD_AVERAGER}.load_accumulators_into_averager_", "peer/diloco.py", called_from=(f"{GRAD_AVERAGER}.step",)
    ),
    Reliance(
        f"{GRAD_AVERAGER}.reset_accumulated_grads_",
        "peer/diloco.py",
        called_from=("hivemind.Optimizer._update_global_epoch", "hivemind.Optimizer.load_state_from_peers"),
    ),
    Reliance(
        f"{STATE_AVERAGER}._apply_averaging_results_",
        "peer/diloco.py, peer/state_loading.py",
        called_from=(f"{STATE_AVERAGER}.step",),
    ),
    Reliance(
        f"{STATE_AVERAGER}._apply_optimizer_parameters_",
        "peer/diloco.py, peer/state_loading.py",
        called_from=(f"{STATE_AVERAGER}.step",),
    ),
    # DilocoStateAverager averages in buffers of its own, so that hivemind applies a round through
    # _apply_averaging_results_ (in place, it copied the outer parameters over the inner steps)
    Reliance(
        f"{STATE_AVERAGER}.__init__",
        "peer/diloco.py",
        params=("reuse_tensors",),
        source_has=("reuse_tensors = offload_optimizer and not delta_rule_averaging",),
    ),
    # DilocoStateAverager notes when a round took this peer's state into its buffers, and has an
    # outer step wait for a round under way (its result is copied over the outer state when applied)
    Reliance(
        f"{STATE_AVERAGER}._load_local_tensors_into_averager_",
        "peer/diloco.py",
        called_from=(f"{STATE_AVERAGER}._do", f"{STATE_AVERAGER}.load_state_from_peers"),
    ),
    Reliance(
        f"{STATE_AVERAGER}.step",
        "peer/diloco.py",
        params=("optimizer_step", "wait_for_delayed_updates"),
        source_has=("if wait_for_delayed_updates:", "self._apply_averaging_results_()"),
    ),
    # CheckedStateAverager takes the epoch of a state taken from a group, with the scheduler's
    Reliance(f"{STATE_AVERAGER}._update_scheduler", "peer/state_loading.py"),
    Reliance("hivemind.averaging.partition.DEFAULT_PART_SIZE_BYTES", "peer/diloco.py, benchmarks/allreduce.py"),
    # ErrorFeedback.round_trip() cuts tensors into parts as TensorPartContainer does
    Reliance(
        "hivemind.compression.CompressionInfo.get_part",
        "peer/diloco.py",
        params=("part_index", "part_size"),
        called_from=(f"{CONTAINER}.__init__",),
    ),
    Reliance(
        "hivemind.compression.CompressionBase.estimate_compression_ratio",
        "peer/diloco.py, peer/codec.py",
        params=("info",),
        called_from=(f"{CONTAINER}.__init__",),
    ),
    Reliance(
        "hivemind.compression.CompressionInfo",
        "peer/codec.py, peer/diloco.py, coordinator/state_sharing.py",
        params=("key", "descriptor", "role"),
    ),
    # peer/codec.py installs its decoders in hivemind's registry, under two closed enum values.
    Reliance(
        f"{SERIALIZATION}._BASE_COMPRESSION_TYPES",
        "peer/codec.py, benchmarks/allreduce.py, tests/peer/test_codec.py",
        params=("BLOCKWISE_8BIT", "UNIFORM_8BIT"),
        called_from=(f"{SERIALIZATION}.serialize_torch_tensor", f"{SERIALIZATION}.deserialize_torch_tensor"),
    ),
    # reducers send averaged parts back through the registry
    Reliance(
        f"{SERIALIZATION}.serialize_torch_tensor",
        "peer/codec.py",
        called_from=(f"{ALLREDUCE}._accumulate_parts_streaming",),
    ),
    Reliance("hivemind.proto.runtime_pb2.BLOCKWISE_8BIT", "peer/codec.py"),
    Reliance("hivemind.proto.runtime_pb2.UNIFORM_8BIT", "peer/codec.py"),
    Reliance("hivemind.proto.runtime_pb2.CompressionType.Name", "peer/codec.py"),
    Reliance(
        "hivemind.proto.runtime_pb2.Tensor",
        "peer/codec.py",
        params=("compression", "buffer", "size", "dtype", "requires_grad"),
    ),
    # peer/identity.py, peer/run_record.py, peer/auth.py, peer/metrics.py: keys, signed records, tokens.
    Reliance(
        "hivemind.utils.crypto.RSAPrivateKey", "peer/identity.py", attrs=("_private_key",)
    ),  # _private_key_from_der() wraps a loaded key in one
    Reliance("hivemind.utils.crypto.RSAPublicKey", "peer/identity.py, peer/run_record.py", attrs=("_public_key",)),
    Reliance("hivemind.utils.crypto.RSAPublicKey.from_bytes", "peer/run_record.py, peer/auth.py"),
    Reliance("hivemind.p2p.p2p_daemon_bindings.datastructures.PeerID.from_base58", "peer/identity.py"),
    # peer_id_of() derives a peer id from a public key the same way
    Reliance(
        "hivemind.p2p.p2p_daemon_bindings.datastructures.PeerID.from_identity",
        "peer/identity.py",
        source_has=("crypto_pb2.PublicKey(", "hashlib.sha256(", 'multihash.coerce_code("sha2-256")'),
    ),
    Reliance("hivemind.proto.crypto_pb2.PrivateKey", "peer/identity.py", params=("key_type", "data")),
    Reliance("hivemind.proto.crypto_pb2.PublicKey", "peer/identity.py", params=("key_type", "data")),
    Reliance("hivemind.proto.crypto_pb2.KeyType.RSA", "peer/identity.py"),
    Reliance("hivemind.proto.crypto_pb2.RSA", "peer/identity.py"),
    Reliance("hivemind.utils.multiaddr.Multiaddr", "peer/identity.py"),
    Reliance("hivemind.dht.crypto.RSASignatureValidator._PUBLIC_KEY_RE", "peer/run_record.py, benchmarks/records.py"),
    # benchmarks/records.py signs the records of many peers as each one's DHT node would
    Reliance("hivemind.dht.crypto.RSASignatureValidator.sign_value", "benchmarks/records.py", params=("record",)),
    Reliance(
        "hivemind.dht.validation.DHTRecord",
        "benchmarks/records.py",
        params=("key", "subkey", "value", "expiration_time"),
    ),
    Reliance(
        "hivemind.dht.node.DHTNode.store_many",
        "benchmarks/records.py",
        params=("keys", "values", "expiration_time", "subkeys"),
    ),
    Reliance("hivemind.dht.crypto.RSASignatureValidator.local_public_key", "peer/metrics.py, peer/run_record.py"),
    Reliance(
        "hivemind.dht.schema.SchemaValidator",
        "peer/metrics.py, coordinator/coordinator.py",
        params=("schema", "prefix"),
    ),
    # records live under {prefix}_{field}: {run_id}_metrics, {training_key}_progress
    Reliance(
        "hivemind.dht.schema.SchemaValidator.__init__",
        "peer/metrics.py, coordinator/swarm.py",
        source_has=('f"{prefix}_{field.name}"',),
    ),
    # PeerMetrics is a pydantic.v1 model because hivemind's record schemas are
    Reliance("hivemind.dht.schema", "peer/metrics.py", source_has=("import pydantic.v1 as pydantic",)),
    Reliance("hivemind.dht.schema.BytesWithPublicKey", "peer/metrics.py"),
    Reliance(AUTHORIZER, "peer/auth.py", params=("local_private_key",)),
    Reliance(f"{AUTHORIZER}.get_token", "peer/auth.py", called_from=(f"{AUTHORIZER}.refresh_token_if_needed",)),
    Reliance(
        f"{AUTHORIZER}.is_token_valid",
        "peer/auth.py",
        called_from=(f"{AUTHORIZER}.validate_request", f"{AUTHORIZER}.validate_response"),
    ),
    Reliance(
        f"{AUTHORIZER}.does_token_need_refreshing",
        "peer/auth.py",
        called_from=(f"{AUTHORIZER}.refresh_token_if_needed",),
    ),
    Reliance(f"{AUTHORIZER}.local_public_key", "peer/auth.py"),
    Reliance(
        "hivemind.proto.auth_pb2.AccessToken",
        "peer/auth.py",
        params=("username", "public_key", "expiration_time", "signature"),
    ),
    # peer/command_line.py sends hivemind's records through Starling's one handler.
    Reliance("hivemind.utils.logging.use_hivemind_log_handler", "peer/command_line.py", params=("where",)),
    # coordinator/state_sharing.py serves checkpoints as a state averager would.
    Reliance(
        AVERAGER,
        "coordinator/state_sharing.py",
        params=("averaged_tensors", "dht", "prefix", "state_compression", "allow_state_sharing", "start"),
    ),
    Reliance(
        f"{AVERAGER}.get_current_state", "coordinator/state_sharing.py", called_from=(f"{AVERAGER}.__init__",)
    ),  # served from a thread __init__ starts
]


def resolve(path: str) -> object:
    """The object at a dotted path: the longest importable module prefix, then attributes.
    Raises LookupError when a part is missing."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        name = ".".join(parts[:split])
        try:
            found = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or not name.startswith(error.name):
                raise  # a module that exists failed to import one of its own
            continue
        for attribute in parts[split:]:
            if not hasattr(found, attribute):
                raise LookupError(path)
            found = getattr(found, attribute)
        return found
    raise LookupError(path)


def parameters(found: object) -> set[str]:
    """The names a caller can pass or read: a protobuf message's fields, a dict's keys, a callable's
    parameters (for a class, those of every hivemind __init__ along its bases, which **kwargs reach)."""
    if isinstance(found, dict):
        return set(found)
    descriptor = getattr(found, "DESCRIPTOR", None)
    if hasattr(descriptor, "fields_by_name"):
        return set(descriptor.fields_by_name)
    if isinstance(found, type):
        inits = [
            klass.__dict__["__init__"]
            for klass in found.__mro__
            if klass.__module__.startswith("hivemind") and "__init__" in klass.__dict__
        ]
        if inits:
            return {name for init in inits for name in inspect.signature(init).parameters}
    return set(inspect.signature(found).parameters)


@functools.cache
def assigned_to_self(klass: type) -> frozenset[str]:
    """The names a class's own methods assign to `self.<name>`."""
    return frozenset(
        node.attr
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    )


def instance_attributes(cls: type) -> set[str]:
    """Attributes of cls, and the names the methods of its hivemind bases assign to `self.<name>`."""
    return set(dir(cls)).union(
        *(assigned_to_self(klass) for klass in cls.__mro__ if klass.__module__.startswith("hivemind"))
    )


def referenced_names(function: object) -> set[str]:
    """The names and string constants in a function's code, nested functions included."""
    function = inspect.unwrap(getattr(function, "__func__", function))
    names: set[str] = set()
    pending = [function.__code__]
    while pending:
        code = pending.pop()
        names.update(code.co_names)
        for constant in code.co_consts:
            if isinstance(constant, types.CodeType):
                pending.append(constant)
            elif isinstance(constant, str):
                names.add(constant)
    return names


def source_of(found: object) -> str:
    return inspect.getsource(found.fget if isinstance(found, property) else found)


def broken(reliance: Reliance) -> list[str]:
    """One line for each way hivemind no longer has what `reliance` needs."""
    member, users = reliance.member, reliance.users
    try:
        found = resolve(member)
    except LookupError:
        return [f"{member} is gone: {users} relies on it"]
    problems = []
    if reliance.params:
        present = parameters(found)
        problems += [
            f"{member} no longer has {name!r}: {users} relies on it" for name in reliance.params if name not in present
        ]
    if reliance.attrs:
        present = instance_attributes(found)
        problems += [
            f"{member} no longer sets .{name}: {users} relies on it" for name in reliance.attrs if name not in present
        ]
    name = member.rsplit(".", 1)[-1]
    for caller in reliance.called_from:
        try:
            calls = name in referenced_names(resolve(caller))
        except LookupError:
            calls = False
        if not calls:
            problems.append(f"{caller} no longer calls {name}: {users} relies on it")
    if reliance.source_has:
        source = source_of(found)
        problems += [
            f"{member} no longer holds {text!r}: {users} relies on it"
            for text in reliance.source_has
            if text not in source
        ]
    return problems


@pytest.fixture
def hivemind_own_code():
    """hivemind without peer/hivemind_fixes.py's corrections, which replace some of the members checked."""
    from peer import hivemind_fixes

    hivemind_fixes.revert()
    yield
    hivemind_fixes.apply()


@pytest.mark.parametrize("reliance", CONTRACT, ids=lambda reliance: f"{reliance.member} [{reliance.users}]")
def test_hivemind_still_has_what_starling_relies_on(reliance: Reliance, hivemind_own_code):
    problems = broken(reliance)
    assert not problems, "\n".join(problems)


def internal_imports(path: Path) -> set[str]:
    """What a file imports from internal hivemind modules, as dotted paths: names from a module below
    hivemind's packages (hivemind.x.y...), and modules themselves (`from hivemind.optim import state_averager`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "hivemind":
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if node.module.count(".") >= 2 or importlib.util.find_spec(name) is not None:
                    found.add(name)
    return found


def test_every_internal_import_is_listed():
    """A new import from an internal hivemind module goes into CONTRACT (the member itself, or a
    member of it)."""
    listed = {reliance.member for reliance in CONTRACT}
    unlisted = sorted(
        f"{name} ({path.relative_to(ROOT)})"
        for folder in STARLING_CODE
        for path in sorted((ROOT / folder).rglob("*.py"))
        for name in internal_imports(path)
        if not any(member == name or member.startswith(f"{name}.") for member in listed)
    )
    assert not unlisted, "imported from hivemind's internals but not in CONTRACT: " + ", ".join(unlisted)


def call_keywords(source: str, function: str) -> set[str]:
    """The keyword names of the call that `function` (defined in `source`) returns."""
    tree = ast.parse(textwrap.dedent(source))
    definition = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == function)
    call = next(node.value for node in ast.walk(definition) if isinstance(node, ast.Return))
    return {keyword.arg for keyword in call.keywords if keyword.arg is not None}


STARLING_KEYWORDS = {"counts_itself"}  # RunProgressTracker's own setting


@pytest.mark.parametrize("factory", ["_make_state_averager", "_make_progress_tracker"])
def test_the_collaborative_optimizer_builds_its_parts_with_hivemind_s_settings(factory: str):
    """CollaborativeOptimizer rewrites these factories of hivemind.Optimizer to build Starling's
    classes: a setting hivemind adds or drops would otherwise go missing unnoticed."""
    import hivemind

    ours = call_keywords((ROOT / "peer" / "optimizer.py").read_text(encoding="utf-8"), factory) - STARLING_KEYWORDS
    theirs = call_keywords(inspect.getsource(getattr(hivemind.Optimizer, factory)), factory)
    assert ours == theirs, f"peer/optimizer.py passes {sorted(ours - theirs)}, hivemind {sorted(theirs - ours)}"


def test_a_broken_reliance_is_named_in_one_line():
    """What a failure looks like: the member, what is wrong, and who relies on it."""
    assert broken(Reliance(f"{ALLREDUCE}._communicate_with_peers", "peer/averager.py")) == [
        f"{ALLREDUCE}._communicate_with_peers is gone: peer/averager.py relies on it"
    ]
    assert broken(
        Reliance(
            f"{ALLREDUCE}._communicate_with_peer", "x.py", params=("peer",), called_from=(f"{ALLREDUCE}.__init__",)
        )
    ) == [
        f"{ALLREDUCE}._communicate_with_peer no longer has 'peer': x.py relies on it",
        f"{ALLREDUCE}.__init__ no longer calls _communicate_with_peer: x.py relies on it",
    ]
    assert broken(Reliance(REDUCER, "x.py", attrs=("accumulators",), source_has=("nowhere",))) == [
        f"{REDUCER} no longer sets .accumulators: x.py relies on it",
        f"{REDUCER} no longer holds 'nowhere': x.py relies on it",
    ]
