"""One way to start, watch and stop the processes of a swarm on this machine: the demo, the tests and
the benchmarks all use it.

- CoordinatorProcess: `starling-coordinator` on loopback, ready once its API names an address to join;
- PeerProcess: a peer, either the `starling-peer` command as volunteers run it, or the harness peer
  (coordinator.harness_peer) driven by a PeerSpec: the Python API with declared faults
  (peer.faults.FaultPlan), a start line and snapshots of its parameters;
- release(): wait until every held peer has joined, then let them all train at once (a held process
  waits with wait_at_start_line);
- bootstrap_node(): a plain hivemind DHT node that peers join through;
- headless_chromium(): a browser for the dashboard.

Every process runs in a session of its own (so that stopping it reaches hivemind's helper processes),
with one compute thread unless told otherwise, its output in a log file; what it did is read from
its event stream (peer.events) and files, never from its log.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from peer.events import read_events

if TYPE_CHECKING:  # peer.faults imports torch and hivemind, which starting a process does not need
    from playwright.sync_api import Browser

    from peer.faults import FaultPlan

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LISTEN_PORTS = range(20000, 32768)  # below Linux's default ephemeral range
HOLD_TIMEOUT = 900.0  # seconds a process at its start line waits to be released
STOP_GRACE = 30.0  # seconds a process gets to stop after SIGTERM before it is killed
POLL = 0.1  # seconds between two looks at a condition
STARLING_PEER = Path(sys.executable).with_name("starling-peer")  # the command pip installed beside Python
LOOPBACK_MADDR = "/ip4/127.0.0.1/tcp/0"  # libp2p listening on loopback, on a port the system picks
# starling-peer's options for a volunteer on this machine: loopback, micro-batch 4 (what two cores train briskly)
LOOPBACK_VOLUNTEER = ("--host-maddrs", LOOPBACK_MADDR, "--batch-size", "4")
_handed_out: set[int] = set()  # by this process, maybe not bound yet by whoever got them

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A process of the swarm stopped, failed or did not get ready in time; the message says which."""


def _ephemeral_ports() -> range:
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on, for a process about to be started with it.

    Drawn outside the kernel's ephemeral range: a port that bind(0) hands out and releases may be
    taken by any outgoing connection (the libp2p daemons open many) before the process binds it,
    whereas a port outside that range is only ever taken by someone asking for it by number."""
    ephemeral = _ephemeral_ports()
    candidates = [port for port in LISTEN_PORTS if port not in ephemeral and port not in _handed_out]
    draw = random.Random()  # seeded from the OS: parallel processes draw independently
    for port in draw.sample(candidates, k=min(200, len(candidates))):
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port on {host} in {LISTEN_PORTS.start}-{LISTEN_PORTS.stop - 1}")


def wait_until(
    condition: Callable[[], T], timeout: float, what: str, alive: Sequence[ManagedProcess] = (), period: float = POLL
) -> T:
    """Poll condition() until it returns something true, and return that. Raises HarnessError after
    `timeout` seconds, or as soon as one of the `alive` processes has exited."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        for process in alive:
            process.check_running(f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(period)
    return found


class ManagedProcess:
    """A process in a session of its own, its output in `log`."""

    def __init__(
        self,
        command: list[str],
        log: Path,
        threads: int = 1,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.log = log
        self.name = log.parent.name if log.name == "log.txt" else log.stem
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def check_running(self, context: str = "") -> None:
        code = self.process.poll()
        if code is not None:
            raise HarnessError(f"{self.name} exited with status {code} {context}; its log ends:\n{self.log_tail()}")

    def wait_exit(self, timeout: float) -> int:
        """Its exit status, waiting at most `timeout` seconds (HarnessError after that)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} did not exit within {timeout:.0f} s; its log ends:\n{self.log_tail()}"
            ) from None

    def terminate(self) -> None:
        """SIGTERM, as Ctrl-C or a service manager would stop it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the process and whatever of its session is left (hivemind's helper processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def stop_all(processes: Sequence[ManagedProcess], grace: float = STOP_GRACE) -> None:
    """SIGTERM to all, up to `grace` seconds for them to exit, then SIGKILL to what is left."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        process.kill()


def exit_statuses(processes: Sequence[ManagedProcess], timeout: float) -> list[int]:
    """Wait for each process to exit by itself (HarnessError after `timeout` seconds), then kill
    what is left of their sessions; their exit statuses."""
    try:
        return [process.wait_exit(timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()


class CoordinatorProcess(ManagedProcess):
    """`starling-coordinator` with its own state dir, on loopback; started by start()."""

    def __init__(
        self,
        folder: Path,
        run_toml: Path | str,
        dashboard_port: int | None = None,
        dht_port: int | None = None,
        state_dir: Path | None = None,
        arguments: list[str] | None = None,
    ) -> None:
        self.folder, self.run_toml = folder, Path(run_toml)
        self.arguments = arguments or []  # more starling-coordinator arguments
        self.state_dir = state_dir or folder / "state"
        self.dashboard_port = dashboard_port or free_port()
        self.dht_port = dht_port or free_port()
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120) -> CoordinatorProcess:
        """Start it (again, after a stop) and wait until its API names an address to join."""
        self.starts += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            *(sys.executable, "-m", "coordinator.cli", "--config", str(self.run_toml)),
            *("--state-dir", str(self.state_dir), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.dht_port}"),
            *("--dashboard-port", str(self.dashboard_port), "--events", str(self.events_path)),
            *self.arguments,
        ]
        super().__init__(command, self.folder / f"coordinator-{self.starts}.log")
        wait_until(self._ready, timeout, "the coordinator's address", alive=[self])
        return self

    def _ready(self) -> bool:
        try:
            return bool(self.state()["initial_peers"])
        except OSError:
            return False

    @property
    def events_path(self) -> Path:
        return self.folder / "events.jsonl"

    def events(self) -> list[dict]:
        """What the coordinator did so far (coordinator.events), over all its starts."""
        return read_events(self.events_path) if self.events_path.exists() else []

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def address(self) -> str:
        return self.state()["initial_peers"][0]

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read()

    def state(self) -> dict:
        return json.loads(self.get("/api/v1/state"))

    def history(self) -> list[dict]:
        return json.loads(self.get("/api/v1/history"))["points"]

    def metrics(self) -> dict[str, list]:
        """Samples of /metrics by metric family name, parsed with prometheus_client's parser."""
        from prometheus_client.parser import text_string_to_metric_families

        families = text_string_to_metric_families(self.get("/metrics").decode())
        return {family.name: family.samples for family in families}

    def wait_for(self, condition: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """Poll /api/v1/state until condition(state) holds; returns that state."""
        latest: dict = {}

        def check() -> dict | None:
            nonlocal latest
            latest = self.state()
            return latest if condition(latest) else None

        try:
            return wait_until(check, timeout, what, alive=[self], period=1.0)
        except HarnessError as error:
            raise HarnessError(f"{error}; last state: {json.dumps(latest)[:3000]}") from None

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, and its exit status once it has stopped."""
        self.terminate()
        return self.wait_exit(timeout)

    def kill(self) -> None:
        if self.process is not None:
            super().kill()


@dataclass
class PeerSpec:
    """What a harness peer does (coordinator.harness_peer runs one from this, as JSON)."""

    options: dict[str, Any]  # Peer keyword arguments (peer.options.PeerOptions' fields)
    duration: float | None = None  # seconds of training
    max_epochs: int | None = None  # train until the run reaches this epoch
    faults: FaultPlan | None = None  # the faults it injects; None: none
    start_after: str | None = None  # a file: the peer starts only once it exists
    hold_until: str | None = None  # a file: once joined, the peer trains only once it exists
    snapshots: bool = False  # save the parameters of every epoch, of every state it loads and of DiLoCo rounds
    threads: int = 1  # torch compute threads
    hivemind_fixes: bool = True  # False: hivemind's own code where peer.hivemind_fixes corrects it


class PeerFolder:
    """What a peer leaves in its folder: log.txt, events.jsonl (peer.events) and, for a harness peer,
    ready (joined, held at its start line), summary.json, params.safetensors, and with snapshots
    epoch-N.safetensors and state-N.safetensors (see coordinator.harness_peer). Subclasses say
    whether the peer still runs: check_running(context) and wait_exit(timeout), as ManagedProcess
    has them."""

    folder: Path
    name: str

    def log_text(self) -> str:
        return (self.folder / "log.txt").read_text(errors="replace")

    def log_tail(self, characters: int = 3000) -> str:
        return self.log_text()[-characters:]

    def wait(self, timeout: float) -> dict:
        """Its summary once it has exited with status 0: summary.json of a harness peer, else the
        fields of its "stopped" event. HarnessError if it failed or is still running after `timeout`."""
        code = self.wait_exit(timeout)
        if code != 0:
            raise HarnessError(f"{self.name} exited with status {code}; its log ends:\n{self.log_tail()}")
        summary = self.folder / "summary.json"
        if summary.exists():
            return json.loads(summary.read_text())
        return self.wait_for_event("stopped", timeout=0)

    def ready(self) -> bool:
        """Whether a harness peer held at its start line has joined the run and waits to be released."""
        return (self.folder / "ready").exists()

    def events(self, kind: str | None = None) -> list[dict]:
        """What the peer has done so far, from its event stream (peer.events): every event, or those of `kind`."""
        path = self.folder / "events.jsonl"
        events = read_events(path) if path.exists() else []
        return events if kind is None else [event for event in events if event["event"] == kind]

    def wait_for_event(self, event: str, timeout: float = 120) -> dict:
        """The first event of this kind, once the peer has written it."""
        found = lambda: next(iter(self.events(event)), None)  # noqa: E731
        return wait_until(found, timeout, f"{self.name}'s {event!r} event", alive=[self] if timeout else [])

    def logged_epoch(self) -> int:
        """The latest epoch the peer has reached so far (0 before its first), from its events."""
        return max((e["epoch"] for e in self.events() if e["event"] in ("epoch", "state_loaded")), default=0)

    def params(self) -> dict:
        from safetensors.torch import load_file

        return load_file(self.folder / "params.safetensors")

    def snapshot_path(self, epoch: int, loaded: bool = False) -> Path:
        """The path of snapshot_name(epoch, loaded) in its folder (harness peers with snapshots); of a
        state taken more than once, the latest."""
        return self.folder / snapshot_name(epoch, loaded)

    def snapshot(self, epoch: int, loaded: bool = False) -> dict:
        from safetensors.torch import load_file

        return load_file(self.snapshot_path(epoch, loaded))


def snapshot_name(epoch: int, loaded: bool = False) -> str:
    """The file of a harness peer's parameters on reaching `epoch`: by training, or with `loaded`
    by taking another peer's state of that epoch."""
    return f"{'state' if loaded else 'epoch'}-{epoch}.safetensors"


def write_spec(folder: Path, spec: PeerSpec) -> Path:
    """The spec of a harness peer, written into its folder (made if need be) as JSON, its FaultPlan
    as a JSON object of its fields (coordinator.harness_peer.read_spec reads it back)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.json"
    path.write_text(json.dumps(asdict(spec)))
    return path


class PeerProcess(ManagedProcess, PeerFolder):
    """A peer process and the files it leaves in its folder (PeerFolder). `wrap` prefixes the
    command line (such as `ip netns exec NAMESPACE`, keeping the process id)."""

    def __init__(self, folder: Path, command: list[str], threads: int = 1) -> None:
        self.folder = folder
        super().__init__(command, folder / "log.txt", threads=threads)

    @classmethod
    def harness_peer(cls, folder: Path, spec: PeerSpec, wrap: Sequence[str] = ()) -> PeerProcess:
        """The harness peer (the Python API) doing what `spec` says."""
        command = [*wrap, sys.executable, "-m", "coordinator.harness_peer", str(write_spec(folder, spec))]
        return cls(folder, command, threads=spec.threads)

    @classmethod
    def command_line(cls, folder: Path, arguments: Sequence[str], wrap: Sequence[str] = ()) -> PeerProcess:
        """`starling-peer ARGUMENTS` as a volunteer runs it, writing its events into the folder."""
        folder.mkdir(parents=True, exist_ok=True)
        events = ["--events", str(folder / "events.jsonl")]
        return cls(folder, [*wrap, str(STARLING_PEER), *arguments, *events])


class PeerFleet(ManagedProcess):
    """Harness peers forked from one warmed-up process (coordinator.harness_fleet), for swarms of
    dozens of peers on one machine: they share its imported torch, hivemind and Starling copy-on-write.
    `peers` are their handles (FleetPeer), in the order of `specs`; stop_all([fleet]) stops them all.

    Two settings of the peers' helpers save memory without changing what the swarm does: hivemind's
    shared tensors go through file descriptors (its HIVEMIND_MEMORY_SHARING_STRATEGY) instead of
    torch's shared-memory manager, a process of 60 MiB per peer; and each libp2p daemon collects its
    garbage sooner (Go's GOGC at 25 instead of 100: 65 MiB instead of 90)."""

    ENV = {"HIVEMIND_MEMORY_SHARING_STRATEGY": "file_descriptor", "GOGC": "25"}

    def __init__(self, folder: Path, specs: Sequence[tuple[str, PeerSpec]], threads: int = 1) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [write_spec(folder / name, spec) for name, spec in specs]
        self.peers = [FleetPeer(path.parent, self) for path in paths]
        command = [sys.executable, "-m", "coordinator.harness_fleet", *map(str, paths)]
        super().__init__(command, folder / "fleet.log", threads=threads, env=self.ENV)


class FleetPeer(PeerFolder):
    """A peer of a PeerFleet: its process id is in its folder's `pid`, its exit status in
    `exit_status` once it has ended."""

    def __init__(self, folder: Path, fleet: PeerFleet) -> None:
        self.folder, self.name, self.fleet = folder, folder.name, fleet

    @property
    def pid(self) -> int | None:
        path = self.folder / "pid"
        return int(path.read_text()) if path.exists() else None

    def exit_status(self) -> int | None:
        path = self.folder / "exit_status"
        return int(path.read_text()) if path.exists() else None

    def check_running(self, context: str = "") -> None:
        code = self.exit_status()
        if code is not None:
            raise HarnessError(f"{self.name} exited with status {code} {context}; its log ends:\n{self.log_tail()}")
        self.fleet.check_running(f"(the fleet of {self.name}) {context}")

    def wait_exit(self, timeout: float) -> int:
        """Its exit status (the fleet's, if the fleet ended without saying), waiting at most `timeout` seconds."""
        ended = lambda: self.exit_status() is not None or self.fleet.process.poll() is not None  # noqa: E731
        wait_until(ended, timeout, f"{self.name} to exit")
        code = self.exit_status()
        return self.fleet.process.returncode if code is None else code


def wait_at_start_line(folder: Path, go: Path, timeout: float = HOLD_TIMEOUT) -> None:
    """The held process's side of release(): say it has joined (`ready` in its folder, what
    PeerFolder.ready reads), then wait until `go` exists."""
    (folder / "ready").touch()
    wait_until(go.exists, timeout, "the release from the start line", period=0.05)


def release(peers: Sequence[PeerFolder], go: Path, timeout: float = 120) -> float:
    """Wait until every peer (harness peers held until `go` exists) has joined and waits at its
    start line, then let them all start training at once; returns when (time.time()).

    Peers that start training one by one race: the first alone in the swarm takes its epochs without
    averaging (hivemind averages only with more than one peer in the progress records), and with a
    tiny model it can reach a test's last epoch before a slower-starting peer has joined. When one
    does not join, every peer is stopped: none would ever leave its start line (a PeerFleet's peers
    stop with their fleet, which its owner stops)."""
    try:
        wait_until(lambda: all(peer.ready() for peer in peers), timeout, "the peers to join", alive=peers)
    except HarnessError:
        stop_all([peer for peer in peers if isinstance(peer, ManagedProcess)])
        raise
    go.touch()
    return time.time()


@contextlib.contextmanager
def bootstrap_node(maddr: str = LOOPBACK_MADDR) -> Iterator[str]:
    """A plain hivemind DHT node listening on `maddr`, for peers to join through; yields its address."""
    import hivemind

    dht = hivemind.DHT(host_maddrs=[maddr], start=True)
    try:
        yield str(dht.get_visible_maddrs()[0])
    finally:
        dht.shutdown()


# As root, Chromium needs --no-sandbox; the other flags keep it from reaching out on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@contextlib.contextmanager
def headless_chromium() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (Playwright's own browser downloads are not used)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise HarnessError("chromium is not installed: run `make system-packages` (as root; Debian package chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
