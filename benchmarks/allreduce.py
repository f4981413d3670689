"""Where the all-reduce time goes: one averaging round among peers on loopback, hivemind's
DecentralizedAverager with each codec against torch.distributed all_reduce (gloo).

    python benchmarks/allreduce.py                      # 2 and 4 peers, 10 M and 50 M values, every codec
    python benchmarks/allreduce.py --skip quantile8     # every codec but the slow quantile one
    python benchmarks/allreduce.py --peers 2 --sizes 1000000 --rounds 3 --codecs none starling8
    python benchmarks/allreduce.py --peers 2 --sizes 10000000 --codecs none starling8 \\
        --part-size-bytes 524288 2097152 4194304     # the effect of hivemind's part size
    python benchmarks/allreduce.py --peers 2 --sizes 10000000 --rounds 2 --codecs none starling8 --profile
    python benchmarks/allreduce.py --peers 2 4 --sizes 10000000 --codecs adaptive --aggregation centered-clip

Each peer is a process on 127.0.0.1 with its own hivemind DHT (rank 0 first, the others join
it) and one float32 N(0,1) tensor (seeded by rank). For each codec and part size the peers
create an averager with target_group_size = min_group_size = peers, pre-schedule a step
(require_trigger=True), wait until the group is formed (matchmaking s), meet at a barrier, allow
the all-reduce and time it until every peer has its result (round s: the slowest peer). The
reducers combine their parts with hivemind's weighted mean, or with --aggregation centered-clip
as Starling's peers do by default (peer.averager.AggregatingAverager). The same processes time
gloo's all_reduce of the same tensor followed by the division by the number of peers. One
warm-up round each, then the median of --rounds rounds.

Columns: `error` is the largest relative L2 error of an averaged tensor against the exact mean
of every rank's input (each rank regenerates the others' data); `!` marks an error above what
the codec's own error allows (hivemind averages partially, without failing, when a part does
not arrive or does not decode). `MB/peer` is what crossed the loopback interface during the
round (its transmit counter, /proc/net/dev) over the number of peers, so it holds libp2p's
framing, encryption and TCP headers and assumes nothing else uses loopback meanwhile; `theory`
is the butterfly figure 2(N-1)/N x the payload on the wire (float32 for gloo and `none`, the
codec's bytes per value otherwise). `x bound` is the round time over that payload's lower bound
2(N-1)/N x payload bytes / loopback bandwidth, measured first with a plain TCP transfer between
two processes (1 GiB in 4 MiB sends, median of 3). `cpu s` is the CPU time of one peer during the
round: all its processes (worker, averager, DHT, p2pd daemon), averaged over peers and rounds.

--profile adds, per hivemind row, each kind of process's CPU seconds, and for rank 0 a cProfile
of its averager process (where hivemind runs the all-reduce): the event-loop thread and the
executor threads that compress and decode, each with its CPU seconds.

The codecs: none, fp16, scaled-fp16, uniform8, quantile8 and blockwise8 (bitsandbytes) are
hivemind's; starling8 is peer.codec.Blockwise8Bit; adaptive is what peers use by default
(peer.compression.gradient_compression of the run config's [averaging] section). Prints a table
and writes benchmarks/results/allreduce-cpu.json (allreduce-cpu-centered-clip.json with
--aggregation centered-clip).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import datetime
import io
import json
import multiprocessing as mp
import os
import platform
import pstats
import queue
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/, first

import hivemind  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from hivemind.averaging.control import AveragingStage  # noqa: E402
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES  # noqa: E402
from hivemind.compression import (  # noqa: E402
    BlockwiseQuantization,
    CompressionBase,
    CompressionInfo,
    deserialize_torch_tensor,
    serialization,
)

from benchmarks.link import stream_bytes_per_second  # noqa: E402
from benchmarks.measure import codec_table, write_json  # noqa: E402
from coordinator.harness import LOOPBACK_MADDR, HarnessError, free_port, wait_until  # noqa: E402
from peer.averager import AggregatingAverager  # noqa: E402
from peer.codec import register  # noqa: E402
from peer.compression import gradient_compression  # noqa: E402
from peer.run_config import AGGREGATIONS, AveragingSection  # noqa: E402

# benchmarks.measure's codecs, and the adaptive one Starling's peers send gradients with by default.
CODECS: dict[str, Callable[[], CompressionBase]] = {
    **codec_table(),
    "adaptive": lambda: gradient_compression(AveragingSection()),
}
GLOO = "gloo"
SAMPLE = 2**20  # values compressed to find a codec's bytes per value and error
TICKS = os.sysconf("SC_CLK_TCK")
SEED = 0
warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # in hivemind's uniform8 codec


@dataclass
class Config:
    world: int
    sizes: list[int]
    codecs: list[str]
    part_sizes: list[int]
    rounds: int
    warmup: int
    threads: int
    profile: bool
    aggregation: str
    gloo_port: int
    timeout: float


def rank_data(numel: int, rank: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(SEED + rank))


def warmed_up(codec: CompressionBase) -> CompressionBase:
    """The codec after one compress and decode: bitsandbytes' first call spends seconds setting up."""
    probe = torch.linspace(-1, 1, 2**16)
    deserialize_torch_tensor(codec.compress(probe, CompressionInfo.from_tensor(probe)))
    return codec


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


def loopback_bytes() -> int:
    """Bytes transmitted on the loopback interface so far."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def _stat_seconds(path: Path) -> float:
    """utime + stime of a /proc .../stat file, in seconds."""
    fields = path.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children(pid: int) -> list[int]:
    return [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]


def cpu_seconds(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each kind of process."""
    return {kind: sum(_stat_seconds(Path(f"/proc/{pid}/stat")) for pid in group) for kind, group in pids.items()}


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds so far of each thread of this process, by native thread id."""
    seconds = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            seconds[int(task.name)] = _stat_seconds(task / "stat")
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return seconds


class ProfilingExecutor(ThreadPoolExecutor):
    """A thread pool that profiles every call it runs, with one cProfile per thread."""

    def __init__(self) -> None:
        super().__init__()
        self.profiles: list[cProfile.Profile] = []
        self.thread_ids: set[int] = set()
        self._local = threading.local()

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        return super().submit(self._profiled, fn, *args, **kwargs)

    def _profiled(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        profile = getattr(self._local, "profile", None)
        if profile is None:
            profile = self._local.profile = cProfile.Profile()
            self.profiles.append(profile)
            self.thread_ids.add(threading.get_native_id())
        profile.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            profile.disable()


class ProfiledAverager(AggregatingAverager):
    """An averager that, while `recording` is set, profiles its all-reduces in its own process (where
    they run): cProfile of the event-loop thread and of the executor threads that compress and decode,
    and the CPU seconds of each kind of thread. Writes them to `folder` after every round."""

    def __init__(self, *args: Any, folder: Path, **kwargs: Any):
        self.folder, self.recording = folder, mp.Value(ctypes.c_bool, False)
        self._loop_profile: cProfile.Profile | None = None
        self._executor: ProfilingExecutor | None = None
        self._thread_cpu = {"event loop": 0.0, "executors": 0.0, "other": 0.0}
        super().__init__(*args, **kwargs)

    async def _aggregate_with_group(self, group_info: Any, min_vector_size: int, **kwargs: Any) -> Any:
        if not self.recording.value:
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        if self._executor is None:
            self._loop_profile, self._executor = cProfile.Profile(), ProfilingExecutor()
            asyncio.get_running_loop().set_default_executor(self._executor)
        before = thread_cpu_seconds()
        self._loop_profile.enable()
        try:
            return await super()._aggregate_with_group(group_info, min_vector_size, **kwargs)
        finally:
            self._loop_profile.disable()
            for tid, seconds in thread_cpu_seconds().items():
                kind = (
                    "event loop"
                    if tid == threading.get_native_id()
                    else "executors"
                    if tid in self._executor.thread_ids
                    else "other"
                )
                self._thread_cpu[kind] += seconds - before.get(tid, 0.0)
            self._loop_profile.dump_stats(self.folder / "loop.prof")
            if self._executor.profiles:
                pstats.Stats(*self._executor.profiles).dump_stats(self.folder / "executors.prof")
            (self.folder / "threads.json").write_text(json.dumps(self._thread_cpu))


def profile_report(folder: Path, rounds: int, top: int = 20) -> str:
    """The profile a ProfiledAverager left in folder, as text."""
    if not (folder / "threads.json").exists():
        return "no profiled round"
    threads = json.loads((folder / "threads.json").read_text())
    text = io.StringIO()
    text.write(
        "rank 0 averager process, CPU s per round by thread: "
        + ", ".join(f"{kind} {seconds / rounds:.3f}" for kind, seconds in threads.items())
        + "\n"
    )
    for name, title in ("loop.prof", "event-loop thread"), ("executors.prof", "executor threads (all together)"):
        if (folder / name).exists():
            for order in "cumulative", "tottime":
                text.write(f"\n--- {title}, {rounds} rounds, by {order} ---\n")
                pstats.Stats(str(folder / name), stream=text).sort_stats(order).print_stats(top)
    return text.getvalue()


def timed_rounds(
    config: Config,
    barrier: Any,
    rank: int,
    prepare: Callable[[], float | None],
    one_round: Callable[[], float],
    check: Callable[[], float],
    pids: Callable[[], dict[str, list[int]]],
    on_timed: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Warm-up rounds, then the timed ones (on_timed() before the first): per round, matchmaking and
    all-reduce seconds, the error of the result, the CPU seconds of each kind of process, (rank 0)
    the loopback bytes, and what went wrong if the round failed (the next round goes on)."""
    records, patience = [], 3 * config.timeout
    for index in range(config.warmup + config.rounds):
        if index == config.warmup:
            on_timed()
        failed = matchmaking = seconds = None
        try:
            matchmaking = prepare()
        except Exception as e:
            failed = f"matchmaking: {e!r}"
        barrier.wait(patience)  # others may still be preparing, but nothing is sent until all are here
        sent = loopback_bytes() if rank == 0 else 0
        processes = pids()
        cpu = cpu_seconds(processes)
        barrier.wait(patience)
        if failed is None:
            try:
                seconds = one_round()
            except Exception as e:
                failed = f"all-reduce: {e!r}"
        barrier.wait(patience)
        cpu = {kind: seconds_after - cpu[kind] for kind, seconds_after in cpu_seconds(processes).items()}
        sent = loopback_bytes() - sent if rank == 0 else None
        if index >= config.warmup:
            records.append(
                dict(
                    matchmaking_s=matchmaking,
                    allreduce_s=seconds,
                    error=check(),
                    cpu=cpu,
                    loopback_bytes=sent,
                    failed=failed,
                )
            )
    return records


def gloo_rounds(config: Config, barrier: Any, rank: int, inputs: torch.Tensor, mean: torch.Tensor) -> list[dict]:
    work = torch.empty_like(inputs)

    def prepare() -> None:
        work.copy_(inputs)

    def one_round() -> float:
        start = time.perf_counter()
        dist.all_reduce(work)
        work.div_(config.world)
        return time.perf_counter() - start

    return timed_rounds(
        config, barrier, rank, prepare, one_round, lambda: relative_error(work, mean), lambda: {"worker": [os.getpid()]}
    )


def hivemind_rounds(
    config: Config,
    barrier: Any,
    rank: int,
    dht: hivemind.DHT,
    codec_name: str,
    part_size: int,
    buffer: torch.Tensor,
    inputs: torch.Tensor,
    mean: torch.Tensor,
) -> tuple[list[dict], str | None]:
    """Rounds of one averager (codec_name, part_size) over buffer; with --profile, rank 0's profile as text."""
    codec = warmed_up(CODECS[codec_name]())
    kwargs = dict(
        averaged_tensors=[buffer],
        dht=dht,
        prefix=f"allreduce_{codec_name}_{part_size}_{inputs.numel()}",
        target_group_size=config.world,
        min_group_size=config.world,
        compression=codec,
        part_size_bytes=part_size,
        allreduce_timeout=config.timeout,
        allow_state_sharing=False,
        aggregation=config.aggregation,
        start=False,
    )
    folder = Path(tempfile.mkdtemp(prefix="allreduce-profile-")) if config.profile and rank == 0 else None
    # Every rank runs the same class: hivemind names an averager's RPC protocols after its class.
    averager = ProfiledAverager(folder=folder, **kwargs) if config.profile else AggregatingAverager(**kwargs)
    if codec_name == "blockwise8":  # bitsandbytes both ways: reducers answer through hivemind's registry,
        serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"] = BlockwiseQuantization()  # Starling's after register()
    averager.run_in_background(await_ready=True, timeout=config.timeout)  # forks the averager's process
    register()
    control = None

    def prepare() -> float:
        nonlocal control
        with averager.get_tensors() as (tensor,):
            tensor.copy_(inputs)
        barrier.wait(3 * config.timeout)
        start = time.perf_counter()
        control = averager.step(wait=False, require_trigger=True, allow_retries=False, timeout=config.timeout)

        def grouped() -> bool:
            if control.done():
                control.result()  # raises what went wrong
                raise RuntimeError("the averaging step finished before its trigger")
            return control.stage == AveragingStage.AWAITING_TRIGGER

        try:  # polled every millisecond: the time to form the group is measured
            wait_until(grouped, config.timeout + 30, "a group", period=0.001)
        except HarnessError:
            control.cancel()
            raise
        return time.perf_counter() - start

    def one_round() -> float:
        start = time.perf_counter()
        control.allow_allreduce()
        try:
            control.result(timeout=config.timeout + 30)
        except TimeoutError:
            control.cancel()
            raise
        return time.perf_counter() - start

    def check() -> float:
        with averager.get_tensors() as (tensor,):
            return relative_error(tensor, mean)

    def pids() -> dict[str, list[int]]:
        return {"worker": [os.getpid()], "averager": [averager.pid], "dht": [dht.pid], "p2pd": children(dht.pid)}

    def start_recording() -> None:
        averager.recording.value = True

    try:
        records = timed_rounds(
            config, barrier, rank, prepare, one_round, check, pids, start_recording if folder else lambda: None
        )
        return records, profile_report(folder, config.rounds) if folder else None
    finally:
        averager.shutdown()


def wire_bytes_per_value(codec_name: str, inputs: torch.Tensor) -> tuple[float, float]:
    """A codec's bytes per value and relative error on the first SAMPLE values of inputs."""
    sample = inputs[:SAMPLE]
    if codec_name == GLOO:
        return 4.0, 0.0
    message = CODECS[codec_name]().compress(sample, CompressionInfo.from_tensor(sample))
    return len(message.buffer) / sample.numel(), relative_error(deserialize_torch_tensor(message), sample)


def worker(rank: int, config: Config, barrier: Any, addresses: mp.Queue, messages: mp.Queue) -> None:
    """One peer: gloo, then each codec and part size, for each tensor size; sends its records to messages."""
    dht = None
    try:
        mp.set_start_method("fork", force=True)  # a spawned process spawns by default; averagers must fork
        torch.set_num_threads(config.threads)
        register()
        if rank == 0:
            dht = hivemind.DHT(start=True, host_maddrs=[LOOPBACK_MADDR])
            for _ in range(config.world - 1):
                addresses.put([str(address) for address in dht.get_visible_maddrs()])
        else:
            dht = hivemind.DHT(start=True, host_maddrs=[LOOPBACK_MADDR], initial_peers=addresses.get(timeout=300))
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{config.gloo_port}",
            rank=rank,
            world_size=config.world,
            timeout=datetime.timedelta(seconds=config.timeout),
        )
        for numel in config.sizes:
            inputs = rank_data(numel, rank)
            mean = sum(rank_data(numel, other) for other in range(config.world)) / config.world
            messages.put(((numel, GLOO, None), rank, gloo_rounds(config, barrier, rank, inputs, mean), None))
            buffer = torch.empty_like(inputs)
            for codec_name in config.codecs:
                for part_size in config.part_sizes:
                    records, profile = hivemind_rounds(
                        config, barrier, rank, dht, codec_name, part_size, buffer, inputs, mean
                    )
                    messages.put(((numel, codec_name, part_size), rank, records, profile))
            del inputs, mean, buffer
    except BaseException:
        messages.put((None, rank, traceback.format_exc(), None))
        barrier.abort()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if dht is not None:
            dht.shutdown()


def summarize(world: int, key: tuple, by_rank: dict[int, list[dict]], bandwidth: float, gloo_s: float | None) -> dict:
    """One row from every rank's records of one method; times, bytes and errors of the rounds that
    did not fail on any rank."""
    numel, method, part_size = key
    rounds = list(zip(*(by_rank[rank] for rank in range(world))))
    good = [ranks for ranks in rounds if not any(record["failed"] for record in ranks)]
    bytes_per_value, codec_error = wire_bytes_per_value(method, rank_data(min(numel, SAMPLE), 0))
    theory = 2 * (world - 1) / world * bytes_per_value * numel
    round_s = [max(record["allreduce_s"] for record in ranks) for ranks in good]
    errors = [max(record["error"] for record in ranks) for ranks in good]
    records = [record for ranks in rounds for record in ranks]
    cpu = {kind: statistics.mean(record["cpu"][kind] for record in records) for kind in records[0]["cpu"]}
    median = statistics.median(round_s) if good else float("nan")
    return dict(
        peers=world,
        numel=numel,
        method=method,
        part_size_bytes=part_size,
        round_s=median,
        rounds_s=round_s,
        x_gloo=median / gloo_s if gloo_s else 1.0,
        matchmaking_s=None
        if method == GLOO
        else statistics.median(max(record["matchmaking_s"] for record in ranks) for ranks in good)
        if good
        else float("nan"),
        sent_bytes_per_peer=statistics.median(ranks[0]["loopback_bytes"] for ranks in good) / world if good else 0,
        theory_bytes_per_peer=theory,
        bytes_per_value=bytes_per_value,
        bound_s=theory / bandwidth,
        x_bound=median / (theory / bandwidth),
        error=max(errors, default=float("nan")),
        errors=errors,
        codec_error=codec_error,
        rounds_too_wrong=sum(error > 4 * codec_error + 1e-5 for error in errors),
        rounds_failed=sorted({record["failed"] for record in records if record["failed"]}),
        cpu_s_per_peer=sum(cpu.values()),
        cpu_s_by_process=cpu,
    )


HEADER = (
    f"{'peers':>5} {'values':>10}  {'method':<12}{'part KiB':>9}{'match s':>8}{'round s':>9}{'x gloo':>8}"
    f"{'MB/peer':>9}{'theory':>8}{'x bound':>8}{'error':>9}{'cpu s':>7}"
)


def format_row(row: dict) -> str:
    part = "-" if row["part_size_bytes"] is None else f"{row['part_size_bytes'] // 1024}"
    matchmaking = "-" if row["matchmaking_s"] is None else f"{row['matchmaking_s']:.2f}"
    line = (
        f"{row['peers']:>5} {row['numel']:>10}  {row['method']:<12}{part:>9}{matchmaking:>8}"
        f"{row['round_s']:>9.3f}{row['x_gloo']:>8.1f}{row['sent_bytes_per_peer'] / 1e6:>9.1f}"
        f"{row['theory_bytes_per_peer'] / 1e6:>8.1f}{row['x_bound']:>8.1f}{row['error']:>9.5f}"
        f"{'!' if row['rounds_too_wrong'] else ' '}{row['cpu_s_per_peer']:>6.2f}"
    )
    failed = row["rounds_failed"]
    return line + "".join(f"\n      failed: {reason}" for reason in failed)


def run_peers(config: Config, bandwidth: float) -> list[dict]:
    """Runs config.world worker processes and returns one row per tensor size and method, printing each."""
    context = mp.get_context("spawn")
    barrier, addresses, messages = context.Barrier(config.world), context.Queue(), context.Queue()
    workers = [
        context.Process(target=worker, args=(rank, config, barrier, addresses, messages))
        for rank in range(config.world)
    ]
    for process in workers:
        process.start()
    pending: dict[tuple, dict[int, list[dict]]] = {}
    profiles: dict[tuple, str] = {}
    rows: list[dict] = []
    expected = len(config.sizes) * (1 + len(config.codecs) * len(config.part_sizes))
    try:
        while len(rows) < expected:
            try:
                key, rank, records, profile = messages.get(timeout=5)
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in workers):
                    raise RuntimeError("a worker died") from None
                continue
            if key is None:
                raise RuntimeError(f"rank {rank} failed:\n{records}")
            pending.setdefault(key, {})[rank] = records
            if profile:
                profiles[key] = profile
            if len(pending[key]) == config.world:
                gloo = next((row["round_s"] for row in rows if row["method"] == GLOO and row["numel"] == key[0]), None)
                rows.append(summarize(config.world, key, pending.pop(key), bandwidth, gloo))
                print(format_row(rows[-1]), flush=True)
                if config.profile and key[1] != GLOO:
                    print(
                        "      CPU s per peer and round: "
                        + ", ".join(f"{kind} {seconds:.3f}" for kind, seconds in rows[-1]["cpu_s_by_process"].items())
                    )
                    print(profiles.pop(key), flush=True)
    finally:
        for process in workers:  # after a failure too: the others stop at the broken barrier and clean up
            process.join(60)
            if process.is_alive():
                process.terminate()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**7, 5 * 10**7], help="float32 values")
    parser.add_argument("--codecs", nargs="+", choices=list(CODECS), default=list(CODECS))
    parser.add_argument("--skip", nargs="+", choices=list(CODECS), default=[], help="codecs to leave out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before each method's timed ones")
    parser.add_argument(
        "--part-size-bytes",
        type=int,
        nargs="+",
        default=[DEFAULT_PART_SIZE_BYTES],
        help="hivemind's part_size_bytes; several values: one row each",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each peer process")
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds for one round's matchmaking or all-reduce before it counts as failed",
    )
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="mean",
        help="how reducers combine parts: hivemind's weighted mean, or Starling's CenteredClip "
        "(what peers run by default)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="CPU seconds per process, and a cProfile of rank 0's averager process"
    )
    args = parser.parse_args()
    if args.timeout < 10:
        parser.error("--timeout must leave room for hivemind's 5 s matchmaking window")
    if tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
        print(f"numpy {np.__version__}: hivemind's 8-bit codecs do not decode (expect partial averages, marked !)")
    codecs = [name for name in args.codecs if name not in args.skip]
    load_before = os.getloadavg()
    bandwidth = statistics.median(stream_bytes_per_second() for _ in range(3))
    print(f"loopback TCP: {bandwidth / 1e9:.2f} GB/s; load average {load_before[0]:.1f}")
    print(HEADER)
    rows = []
    for world in args.peers:
        config = Config(
            world=world,
            sizes=args.sizes,
            codecs=codecs,
            part_sizes=args.part_size_bytes,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            profile=args.profile,
            aggregation=args.aggregation,
            gloo_port=free_port(),
            timeout=args.timeout,
        )
        rows += run_peers(config, bandwidth)
    suffix = "" if args.aggregation == "mean" else f"-{args.aggregation}"
    path = write_json(
        f"allreduce-cpu{suffix}.json",
        dict(
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            load_average_before=load_before[0],
            load_average_after=os.getloadavg()[0],
            python=platform.python_version(),
            torch=torch.__version__,
            hivemind=hivemind.__version__,
            numpy=np.__version__,
            loopback_bytes_per_s=bandwidth,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            profiled=args.profile,
            aggregation=args.aggregation,
            data="float32 N(0,1), seeded by rank",
            command=" ".join(["python", "benchmarks/allreduce.py", *sys.argv[1:]]),
            rows=rows,
        ),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
