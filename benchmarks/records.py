"""The DHT records of many peers: progress and metrics records of 64 to 1,000 peers, their sizes,
a peer's read of the progress record, the coordinator's poll and the dashboard that lists them.

    python benchmarks/records.py                        # 64, 256 and 1,000 peers
    python benchmarks/records.py --peers-list 64        # a quick check

This machine cannot run 1,000 peers (benchmarks/scale.py runs up to 32); what grows with the swarm
in these costs is the records. So one writer process stores the records of N peers, each signed
with that peer's own RSA key as its DHT node would sign it (hivemind's RSASignatureValidator, the
run's schemas), and stores them again every RESTORE_PERIOD seconds with a new time, as peers do.
A real coordinator (`starling-coordinator`) polls them, and a third DHT node reads them as a peer's
progress tracker does. Measured for each N:

- bytes of one signed entry and of the whole record (progress, metrics): what a replica sends for
  each read;
- a peer's read of the progress record (`dht.get(latest=True)` from another node, as hivemind's
  tracker reads it every 0.2-2 s): median of READS; and of the coordinator's summary of it, which
  peers of a swarm of 32 or more read instead (peer.progress.ProgressSummary), with its entry's bytes;
- what a peer's node (one that others cannot reach, so that it receives only its reads) downloads
  a read of the summary, reading every SUMMARY_READ_PERIOD s for SUMMARY_WATCH s: hivemind's read
  of the latest, then a peer's tracker's (the first fresh copy);
- what a peer's node downloads a read of the gradient averagers' matchmaking key while every peer
  looks for a group (each declared, as hivemind's matchmaking declares it): hivemind reads it every
  LEADER_QUEUE_PERIOD s (peer.hivemind_fixes) for the matchmaking time, and each holder of the key
  sends its whole copy for each read: the median past the first read (which also connects to the
  key's holders);
- the coordinator's poll (its API's poll_seconds: both reads, its view of the swarm and the
  progress summary's store), median and max over WATCH seconds, how many peers its API lists
  online, and how often it polled (coordinator.poll_mbit paces its polls);
- the bytes a poll downloads (its API's poll_download_bytes, what its DHT node received during
  the poll), with REPLICA_NODES more nodes in the swarm so that each record has its 5 replicas:
  median over WATCH seconds, in KB and in copies of the two records;
- the dashboard in headless Chromium: seconds from opening the page to N rows in its peers table
  and N entries in the leaderboard, then the longest main-thread task and how many tasks took
  over 50 ms (the browser's "long tasks", which users see as jank) over WATCH seconds of updates,
  and the main thread's busy milliseconds per second over those seconds: in all, and in script,
  style recalculation and layout (Chromium's own counts, DevTools' Performance metrics).

Prints a table and writes benchmarks/results/records-cpu.json.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository, not benchmarks/

import hivemind  # noqa: E402
from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.schema import SchemaValidator  # noqa: E402
from hivemind.dht.validation import DHTRecord  # noqa: E402
from hivemind.optim.progress_tracker import LocalTrainingProgress, TrainingProgressSchema  # noqa: E402
from hivemind.p2p import PeerID  # noqa: E402
from hivemind.utils import MSGPackSerializer, get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.measure import write_json  # noqa: E402
from benchmarks.swarm_runs import RunSettings  # noqa: E402
from coordinator.harness import LOOPBACK_MADDR, CoordinatorProcess, headless_chromium, stop_all, wait_until  # noqa: E402
from coordinator.swarm import received_bytes  # noqa: E402
from peer import metrics  # noqa: E402
from peer.hivemind_fixes import LEADER_QUEUE_PERIOD  # noqa: E402
from peer.identity import peer_id_in_multiaddr  # noqa: E402
from peer.progress import ProgressSummary, RunProgressTracker, summary_key  # noqa: E402
from peer.run_config import AveragingSection, CoordinatorSection, RunConfig  # noqa: E402
from peer.version import VERSION  # noqa: E402

RESTORE_PERIOD = 15.0  # seconds between two stores of every record (peers store theirs every 2-15 s)
RECORD_LIFETIME = 60.0  # seconds a stored record lasts (hivemind's progress records and ours: 60 s)
READS = 10
# Plain DHT nodes besides the writer, the coordinator and the reader: each record then has its 5
# replicas on 5 nodes, as in a swarm of peers, and a read with latest=True downloads each of them.
REPLICA_NODES = 8
WATCH = 20.0  # seconds of coordinator polls and dashboard updates watched
# A peer's tracker reads the run's progress every 0.2 s near an epoch's end (its least refresh
# period), for this many seconds of each way of reading the summary.
SUMMARY_READ_PERIOD, SUMMARY_WATCH = 0.2, 10.0


class ManyPeersSigner(RSASignatureValidator):
    """hivemind's record signature, with many keys: a record whose subkey names one of their public
    keys is signed with that key (as that peer's own DHT node would sign it)."""

    def __init__(self, keys: list[RSAPrivateKey]) -> None:
        super().__init__(keys[0])
        self.signers = {signer.local_public_key: signer for signer in map(RSASignatureValidator, keys)}

    def sign_value(self, record: DHTRecord) -> bytes:
        owner = self._PUBLIC_KEY_RE.search(record.subkey)
        signer = self.signers.get(owner.group(0)) if owner else None
        return signer.sign_value(record) if signer is not None else record.value


def peer_id_bytes(index: int) -> bytes:
    """Peer `index`'s libp2p id, as volunteers' Ed25519 identities give them (38 bytes)."""
    return bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + hashlib.sha256(index.to_bytes(4, "big")).digest()


def peer_records(index: int, epoch: int) -> tuple[dict, dict]:
    """Peer `index`'s progress and metrics values, with figures and strings of a real peer's size."""
    raw = peer_id_bytes(index)
    peer_id = PeerID(raw).to_base58()
    now = get_dht_time()
    samples = 16 + index % 48
    progress = LocalTrainingProgress(
        peer_id=raw, epoch=epoch, samples_accumulated=samples, samples_per_second=12.5, time=now, client_mode=False
    )
    report = metrics.PeerMetrics(
        peer_id=peer_id,
        name=f"volunteer-{index:04d}",
        epoch=epoch,
        loss=3.2109,
        samples_per_second=12.5,
        tokens_per_second=3200.0,
        samples_contributed=1000 + index,
        device="cuda",
        device_name="NVIDIA GeForce RTX 3060",
        micro_batch=4,
        bytes_sent=123456789,
        compute_seconds=1234.5,
        training_seconds=2345.6,
        client_mode=False,
        auxiliary=False,
        version=VERSION,
        rounds_succeeded=100,
        addresses=[f"/ip4/198.51.100.{index % 250 + 1}/tcp/{30000 + index}/p2p/{peer_id}"],
        time=time.time(),
    )
    return progress.dict(), report.dict()


async def _store_records(_dht, node, keys: list, subkeys: list, values: list, expiration: float) -> int:
    stored = await node.store_many(keys, values, expiration_time=expiration, subkeys=subkeys)
    return sum(bool(ok) for ok in stored.values())


class RecordWriter:
    """One DHT node that stores the records of `peers` peers, each signed with its own key."""

    def __init__(self, peers: int, run_id: str, training_key: str, initial_peers: list[str]) -> None:
        keys = [RSAPrivateKey() for _ in tqdm(range(peers), desc="peers' keys", leave=False)]
        signer = ManyPeersSigner(keys)
        self.owners = list(signer.signers)
        self.run_id, self.progress_key = run_id, f"{training_key}_progress"
        validators = [
            signer,
            metrics.schema_validator(run_id),
            SchemaValidator(TrainingProgressSchema, prefix=training_key),
        ]
        self.dht = hivemind.DHT(
            initial_peers=initial_peers, host_maddrs=[LOOPBACK_MADDR], record_validators=validators, start=True
        )
        self.entry_bytes = self._entry_bytes(signer, training_key)
        self._stop = threading.Event()
        if (stored := self.store()) < 2 * peers:
            raise RuntimeError(f"stored {stored} of the {2 * peers} records")
        self._thread = threading.Thread(target=self._keep_storing, daemon=True)
        self._thread.start()

    def store(self) -> int:
        """Store every peer's two records now; returns how many were stored."""
        keys, subkeys, values = [], [], []
        for index, owner in enumerate(self.owners):
            progress, report = peer_records(index, epoch=7)
            keys += [self.progress_key, metrics.record_key(self.run_id)]
            subkeys += [owner, owner]
            values += [progress, report]
        expiration = get_dht_time() + RECORD_LIFETIME
        return self.dht.run_coroutine(
            partial(_store_records, keys=keys, subkeys=subkeys, values=values, expiration=expiration)
        )

    def declare_looking(self, group_key: str) -> int:
        """Declare every peer as looking for a group under `group_key` until the matchmaking time
        from now, as hivemind's matchmaking declares a peer (its id, True); returns how many were stored."""
        peer_ids = [peer_id_bytes(index) for index in range(len(self.owners))]
        expiration = get_dht_time() + AveragingSection.matchmaking_time
        return self.dht.run_coroutine(
            partial(
                _store_records,
                keys=[group_key] * len(peer_ids),
                subkeys=peer_ids,
                values=[True] * len(peer_ids),
                expiration=expiration,
            )
        )

    def _keep_storing(self) -> None:
        while not self._stop.wait(RESTORE_PERIOD):
            self.store()

    def _entry_bytes(self, signer: ManyPeersSigner, training_key: str) -> dict[str, int]:
        """Bytes of one signed entry of each record, as stored and sent (subkey and signed value);
        the summary's is signed by the coordinator's key, here one of the same size."""
        progress, report = peer_records(0, epoch=7)
        summary = ProgressSummary.of([LocalTrainingProgress.parse_obj(progress)], get_dht_time()).dict()
        sizes = {}
        for name, key, value in (
            ("progress", self.progress_key, progress),
            ("metrics", metrics.record_key(self.run_id), report),
            ("summary", summary_key(training_key), summary),
        ):
            subkey = MSGPackSerializer.dumps(self.owners[0])
            record = DHTRecord(MSGPackSerializer.dumps(key), subkey, MSGPackSerializer.dumps(value), get_dht_time())
            sizes[name] = len(subkey) + len(signer.sign_value(record))
        return sizes

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join()
        self.dht.shutdown()


def summary_downloads(dht: hivemind.DHT, coordinator_id: str, training_key: str) -> dict[str, dict[str, float]]:
    """What a peer's node downloads to read the summary, reading every SUMMARY_READ_PERIOD seconds
    for SUMMARY_WATCH seconds: the latest (hivemind's latest=True: every holder's copy and the
    neighbours each node it asks names), then as a peer's tracker reads it (RunProgressTracker: the
    first fresh copy, often its own). For each: reads, and bytes received a read."""

    def watch(read: Callable[[], None], reads: Callable[[], int]) -> dict[str, float]:
        began, done, ends = received_bytes(dht), reads(), time.monotonic() + SUMMARY_WATCH
        while time.monotonic() < ends:
            read()
            time.sleep(SUMMARY_READ_PERIOD)
        count = reads() - done
        return dict(reads=count, bytes_a_read=(received_bytes(dht) - began) / count)

    key, latest_reads = summary_key(training_key), 0

    def read_latest() -> None:
        nonlocal latest_reads
        dht.get(key, latest=True)
        latest_reads += 1

    downloads = dict(latest=watch(read_latest, lambda: latest_reads))
    tracker = RunProgressTracker(dht=dht, prefix=training_key, target_batch_size=1, counts_itself=False, start=True)
    try:
        tracker.read_summaries_from(coordinator_id)
        tracker.fetch_now()  # counts the peers, and reads the summary from then on
        # Its own reads in the background count too: bytes and reads alike.
        downloads["tracker"] = watch(tracker.fetch_now, lambda: tracker.reads["summary"])
    finally:
        tracker.shutdown()
    return downloads


def matchmaking_downloads(writer: RecordWriter, dht: hivemind.DHT, group_key: str) -> dict[str, float]:
    """What a peer's node downloads a read of the matchmaking key while every peer of the writer is
    declared under it, reading it as hivemind's matchmaking does (latest=True, every
    LEADER_QUEUE_PERIOD s for the matchmaking time): reads, entries found (the fewest), and bytes
    received by the first read (it also connects to the key's holders) and by the others (median)."""
    if (declared := writer.declare_looking(group_key)) < len(writer.owners):
        raise RuntimeError(f"declared {declared} of the {len(writer.owners)} peers looking for a group")
    entries, downloads = [], []
    ends = time.monotonic() + AveragingSection.matchmaking_time - 1.0  # the declarations last its matchmaking time
    while time.monotonic() < ends:
        began = received_bytes(dht)
        found = dht.get(group_key, latest=True)
        downloads.append(received_bytes(dht) - began)
        entries.append(len(found.value) if found is not None and isinstance(found.value, dict) else 0)
        time.sleep(LEADER_QUEUE_PERIOD)
    return dict(
        reads=len(downloads),
        entries=min(entries),
        first_read_bytes=downloads[0],
        bytes_a_read=statistics.median(downloads[1:]),
    )


def read_seconds(dht: hivemind.DHT, key: str, peers: int) -> list[float]:
    """Seconds of READS reads of `key` that each found `peers` entries or more."""
    times = []
    for _ in range(READS):
        began = time.perf_counter()
        found = dht.get(key, latest=True)
        times.append(time.perf_counter() - began)
        entries = len(found.value) if found is not None and isinstance(found.value, dict) else 0
        if entries < peers:
            raise RuntimeError(f"a read of {key} found {entries} of {peers} entries")
    return times


LONG_TASKS = """
window.longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
}).observe({type: "longtask", buffered: true});
"""


def dashboard_figures(url: str, peers: int, watch: float = WATCH) -> dict:
    """Open the dashboard: seconds to list every peer and contributor, then its long tasks over `watch` seconds."""
    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.add_init_script(LONG_TASKS)
        began = time.perf_counter()
        page.goto(url)
        rows = "#peers-table tbody tr[data-key]"
        page.wait_for_function(f"document.querySelectorAll('{rows}').length >= {peers}", timeout=120_000)
        listed_s = time.perf_counter() - began
        page.wait_for_function(
            f"document.querySelectorAll('#leaderboard-table tbody tr').length >= {peers}", timeout=120_000
        )
        devtools = page.context.new_cdp_session(page)
        devtools.send("Performance.enable")
        page.evaluate("window.longTasks.length = 0")
        before = main_thread_seconds(devtools)
        time.sleep(watch)
        after = main_thread_seconds(devtools)
        long_tasks = page.evaluate("window.longTasks")
        listed = page.locator(rows).count()
    return dict(
        page_listed_s=listed_s,
        page_rows=listed,
        longest_task_ms=max(long_tasks, default=0.0),
        long_tasks=len(long_tasks),
        # Milliseconds of the page's main thread per second of watching, by what it did.
        main_thread_ms_per_s={work: 1000 * (after[work] - before[work]) / watch for work in MAIN_THREAD_WORK},
    )


MAIN_THREAD_WORK = {  # what the page's main thread did: Chromium's name of its metric
    "all": "TaskDuration",
    "script": "ScriptDuration",
    "style": "RecalcStyleDuration",
    "layout": "LayoutDuration",
}


def main_thread_seconds(devtools) -> dict[str, float]:
    """The page's main-thread seconds so far, by what they went to (MAIN_THREAD_WORK): Chromium's
    own cumulative counts, from DevTools' Performance.getMetrics."""
    metrics = {metric["name"]: metric["value"] for metric in devtools.send("Performance.getMetrics")["metrics"]}
    return {work: metrics[name] for work, name in MAIN_THREAD_WORK.items()}


def measure(folder: Path, peers: int, watch: float = WATCH, poll_mbit: float = CoordinatorSection.poll_mbit) -> dict:
    """Every figure of the module's docstring for a swarm of `peers` peers' records, watching the
    coordinator (its coordinator.poll_mbit as given) and the dashboard for `watch` seconds each."""
    run_id = f"records-{peers}"
    folder.mkdir(parents=True)
    settings = RunSettings(preset="tiny", target_batch_size=64 * peers, poll_mbit=poll_mbit)
    run_toml = settings.write(folder / "run.toml", run_id=run_id)
    training_key = RunConfig.load(run_toml).training_key()
    coordinator = CoordinatorProcess(folder / "coordinator", run_toml).start()
    processes: list = [coordinator]
    writer = reader = summary_reader = None
    replicas: list[hivemind.DHT] = []
    try:
        for _ in tqdm(range(REPLICA_NODES), desc="replica nodes", leave=False):
            replicas.append(hivemind.DHT(initial_peers=[coordinator.address], host_maddrs=[LOOPBACK_MADDR], start=True))
        began = time.perf_counter()
        writer = RecordWriter(peers, run_id, training_key, [coordinator.address])
        stored_s = time.perf_counter() - began
        reader = hivemind.DHT(
            initial_peers=[coordinator.address],
            host_maddrs=[LOOPBACK_MADDR],
            record_validators=[RSASignatureValidator()],
            start=True,
        )
        reads = read_seconds(reader, writer.progress_key, peers)
        wait_until(
            lambda: sum(row["status"] == "online" for row in coordinator.state()["peers"]) >= peers,
            120,
            f"the coordinator to list {peers} peers",
            alive=[coordinator],
        )
        # The coordinator stores its summary after the poll that lists the peers, without waiting.
        wait_until(
            lambda: reader.get(summary_key(training_key)) is not None,
            60,
            "the coordinator's first summary",
            alive=[coordinator],
        )
        summary_reads = read_seconds(reader, summary_key(training_key), 1)
        summary = next(iter(reader.get(summary_key(training_key), latest=True).value.values()))
        # A node of a peer that others cannot reach (client mode) holds no record: it receives only
        # what it reads.
        summary_reader = hivemind.DHT(
            initial_peers=[coordinator.address],
            client_mode=True,
            record_validators=[RSASignatureValidator()],
            start=True,
        )
        summary_read = summary_downloads(summary_reader, peer_id_in_multiaddr(coordinator.address), training_key)
        matchmaking_read = matchmaking_downloads(writer, summary_reader, f"{training_key}_grad_averager.0b")
        polls, downloads, watch_began, first = [], [], time.monotonic(), coordinator.state()
        while time.monotonic() < watch_began + watch:
            state = coordinator.state()
            polls.append(state["poll_seconds"])
            downloads.append(state["poll_download_bytes"])
            time.sleep(1.0)
        last, watched = coordinator.state(), time.monotonic() - watch_began
        exported = coordinator.metrics()  # what Prometheus scrapes
        listed = sum(row["status"] == "online" for row in last["peers"])
        page = dashboard_figures(coordinator.url, peers, watch)
    finally:
        for dht in (summary_reader, reader, writer, *replicas):
            if dht is not None:
                dht.shutdown()
        stop_all(processes)
    return dict(
        peers=peers,
        progress_entry_bytes=writer.entry_bytes["progress"],
        metrics_entry_bytes=writer.entry_bytes["metrics"],
        progress_record_bytes=peers * writer.entry_bytes["progress"],
        metrics_record_bytes=peers * writer.entry_bytes["metrics"],
        store_s=stored_s,
        read_s=statistics.median(reads),
        read_max_s=max(reads),
        summary_entry_bytes=writer.entry_bytes["summary"],
        summary_read_s=statistics.median(summary_reads),
        summary_read_max_s=max(summary_reads),
        summary_lifetime_s=summary.expiration_time - summary.value["time"],
        summary_downloads=summary_read,
        matchmaking_download=matchmaking_read,
        poll_s=statistics.median(polls),
        poll_max_s=max(polls),
        poll_download_bytes=statistics.median(downloads),
        poll_download_min_bytes=min(downloads),
        polls_watched=last["polls"] - first["polls"],
        watched_s=watched,
        poll_wait_s=last["poll_wait_seconds"],
        poll_wait_exported_s=exported["starling_coordinator_poll_wait_seconds"][0].value,
        listed_online=listed,
        **page,
    )


def seconds(row: dict, figure: str) -> str:
    """A row's median and max of `figure` in seconds, as a table cell."""
    return f"{row[figure + '_s']:.3f} ({row[figure + '_max_s']:.3f})"


COLUMNS = {  # the table's columns: header, then the cell of a row
    "peers": lambda row: str(row["peers"]),
    "progress record KB": lambda row: f"{row['progress_record_bytes'] / 1000:.1f}",
    "metrics record KB": lambda row: f"{row['metrics_record_bytes'] / 1000:.1f}",
    "a peer's read of the record s (max)": lambda row: seconds(row, "read"),
    "summary B": lambda row: str(row["summary_entry_bytes"]),
    "a peer's read of the summary s (max)": lambda row: seconds(row, "summary_read"),
    "a summary read's download B: latest, tracker's": lambda row: ", ".join(
        f"{row['summary_downloads'][way]['bytes_a_read']:,.0f}" for way in ("latest", "tracker")
    ),
    "a matchmaking read's download KB (entries)": lambda row: (  # the median, past the first
        f"{row['matchmaking_download']['bytes_a_read'] / 1000:.1f} ({row['matchmaking_download']['entries']})"
    ),
    "coordinator poll s (max)": lambda row: seconds(row, "poll"),
    "a poll's download KB (copies)": lambda row: (
        f"{row['poll_download_bytes'] / 1000:.0f}"
        f" ({row['poll_download_bytes'] / (row['progress_record_bytes'] + row['metrics_record_bytes']):.2f})"
    ),
    "polls/s": lambda row: f"{row['polls_watched'] / row['watched_s']:.2f}",
    "summary lasts s": lambda row: f"{row['summary_lifetime_s']:.0f}",
    "listed online": lambda row: str(row["listed_online"]),
    "page lists all s": lambda row: f"{row['page_listed_s']:.1f}",
    "page rows": lambda row: str(row["page_rows"]),
    "longest task ms": lambda row: f"{row['longest_task_ms']:.0f}",
    "tasks > 50 ms": lambda row: str(row["long_tasks"]),
    "main thread ms/s: all, script, style, layout": lambda row: ", ".join(
        f"{row['main_thread_ms_per_s'][work]:.0f}" for work in MAIN_THREAD_WORK
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers-list", type=int, nargs="+", default=[64, 256, 1000])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="starling-records-"))
    print(f"logs in {folder}", flush=True)
    rows = [measure(folder / f"{peers}-peers", peers) for peers in args.peers_list]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(cell(row) for cell in COLUMNS.values()) + " |")
    command = "python benchmarks/records.py --peers-list " + " ".join(map(str, args.peers_list))
    path = write_json("records-cpu.json", dict(command=command, watch_s=WATCH, reads=READS, rows=rows))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
