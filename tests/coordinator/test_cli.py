"""starling-coordinator from the command line: bad input, ports in use, and access tokens (issued, forged,
revoked) for moderated runs."""

import socket
import subprocess
import sys

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from coordinator import cli as coordinator_cli
from coordinator.harness import LOOPBACK_MADDR, LOOPBACK_VOLUNTEER, STARLING_PEER
from peer.auth import issue_token
from peer.peer import JOIN_ATTEMPTS
from tests.commands import run_at_once


def run_coordinator(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def peer_command(*args: str) -> list[str]:
    """`starling-peer ARGS` on loopback, as a volunteer runs it."""
    return [str(STARLING_PEER), *args, *LOOPBACK_VOLUNTEER]


BAD_RUN_CONFIGS = [
    ('run_id = "x"\n[training]\nbatch = 4\n', "unknown key 'training.batch'"),
    ('[training]\ntarget_batch_size = "many"\n', "training.target_batch_size must be int"),
    ('[model]\npreset = "tiny"\noverrides = { num_attention_heads = 3 }\n', "[model] does not validate"),
    ('[coordinator]\nauth = "password"\n', "coordinator.auth must be one of open, token"),
    ('run_id = "x"\n[model\n', "not valid TOML"),
    ("[diloco]\nouter_lr = 0.5\n", "[diloco] is only for training.mode"),
    ('[training]\nmode = "diloco"\n[diloco]\nouter_momentum = 1.5\n', "diloco.outer_momentum must be in [0, 1)"),
    ('[data]\ndataset = "d41d8cd98f"\n', "data.dataset must be the 64 lowercase hex digits"),
    ('[data]\ndataset = "%s"\nurl = "ftp://host/"\n' % ("ab" * 32), "data.url must be an http:// or https://"),
]


@pytest.mark.parametrize("toml, culprit", BAD_RUN_CONFIGS, ids=[c for _, c in BAD_RUN_CONFIGS])
def test_bad_run_config_exits_2_naming_the_key(tmp_path, capsys, toml, culprit):
    """The command's entry point, called in this process (test_bad_options_exit_2 runs the command
    as a process; nine processes importing the model cost 90 s on two cores)."""
    run_toml = tmp_path / "run.toml"
    run_toml.write_text(toml)
    code = coordinator_cli.main(["--config", str(run_toml), "--state-dir", str(tmp_path / "state")])
    stderr = capsys.readouterr().err
    assert code == 2, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1 and culprit in stderr, stderr[-2000:]


def test_dashboard_port_in_use_is_named(tmp_path, write_run_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_coordinator(
            "--config",
            str(write_run_config(tmp_path)),
            "--state-dir",
            str(tmp_path / "state"),
            "--host-maddrs",
            LOOPBACK_MADDR,
            "--dashboard-port",
            str(port),
        )
    assert result.returncode == 2
    assert f"cannot serve the dashboard on 127.0.0.1:{port}: Address already in use" in result.stderr


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["token", "issue", "--user", "alice", "--ttl", "soon"], "--ttl"),
        (["token", "forget"], "expected 'token issue' or 'token revoke'"),
        (["token", "revoke"], "--user"),
        (["--dashboard-port", "http"], "--dashboard-port"),
        (["--host-maddrs", "/ip4/127.0.0.1/tcp/abc"], "host_maddrs: '/ip4/127.0.0.1/tcp/abc' is not a valid multiaddr"),
        (["--eval-data", "/nowhere/held-out"], "/nowhere/held-out"),
        (["--eval-sequences", "0"], "--eval-sequences"),
    ],
)
def test_bad_options_exit_2(tmp_path, write_run_config, args, culprit):
    result = run_coordinator(*args, "--config", str(write_run_config(tmp_path)))
    assert result.returncode == 2 and culprit in result.stderr, result.stderr[-2000:]


def test_moderated_run_refuses_peers_without_a_valid_or_with_a_revoked_token(
    tmp_path, write_run_config, coordinator, launch_peer
):
    run_toml = write_run_config(tmp_path, auth="token")
    coord = coordinator(run_toml)
    issued = run_coordinator(
        "token",
        "issue",
        "--user",
        "alice",
        "--ttl",
        "1h",
        "--config",
        str(run_toml),
        "--state-dir",
        str(coord.state_dir),
    )
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    forged = issue_token(RSAPrivateKey(), coord.state()["run_id"], "mallory", ttl_seconds=3600)
    eve = run_coordinator(
        "token", "issue", "--user", "eve", "--ttl", "1h", "--config", str(run_toml), "--state-dir", str(coord.state_dir)
    ).stdout.strip()
    revoked = run_coordinator(
        "token", "revoke", "--user", "eve", "--config", str(run_toml), "--state-dir", str(coord.state_dir)
    )  # while the coordinator runs
    assert revoked.returncode == 0 and "revoked 'eve'" in revoked.stdout, revoked.stderr

    member = launch_peer("alice", initial_peers=[coord.address], max_epochs=2, token=token)
    # Refused volunteers see one line naming what to check, and exit with status 2.
    unanswered = f"did not accept this peer in {JOIN_ATTEMPTS} tries (busy, or refusing it)"
    refusals = (
        ([], f"{unanswered}: if the run is moderated, pass --token"),
        (["--token", forged], "token was not issued by the coordinator"),
        (["--token", eve], f"{unanswered}: check that your --token is current"),
    )
    commands = [peer_command("--initial-peers", coord.address, "--max-epochs", "1", *extra) for extra, _ in refusals]
    for (_, culprit), refused in zip(refusals, run_at_once(commands)):
        last_line = refused.stderr.strip().splitlines()[-1]
        assert refused.returncode == 2 and last_line.startswith("starling-peer: error:"), refused.stderr[-2000:]
        assert culprit in last_line, refused.stderr[-2000:]
    assert member.wait(timeout=240)["samples_contributed"] > 0
    names = {peer["name"] for peer in coord.wait_for(lambda s: s["peers"], 30, "the member on the dashboard")["peers"]}
    assert names == {"alice"}
