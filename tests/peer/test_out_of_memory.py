"""A peer whose device runs out of memory in the middle of training goes on with smaller micro-batches."""

from peer.faults import FaultPlan


def test_a_peer_out_of_memory_halves_its_micro_batch_and_contributes_only_what_it_trained(
    tmp_path, write_run_config, start_peer
):
    """Micro-batches of 8 sequences on a device with memory for 3 (peer.faults: memory_for_sequences):
    the first fails, and so does one of 4; the peer goes on with 2 and reaches its epochs. Nothing
    of a failed micro-batch is contributed: every sample counted came from a micro-batch of 2."""
    run_toml = write_run_config(tmp_path, target_batch_size=16)
    peer = start_peer("small-device", run_toml, max_epochs=2, batch_size=8, faults=FaultPlan(memory_for_sequences=3))
    summary = peer.wait(timeout=180)
    events = peer.events()

    assert [e["micro_batch"] for e in events if e["event"] == "out_of_memory"] == [4, 2]
    assert summary["out_of_memory_errors"] == 2
    assert summary["epoch"] >= 2
    micro_batches = sum(e["micro_batches"] for e in events if e["event"] == "epoch")
    assert summary["samples_contributed"] == 2 * micro_batches > 0
