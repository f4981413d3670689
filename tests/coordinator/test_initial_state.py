"""A run started from a transformers checkpoint: peers train from its weights, not from random ones."""

import torch
from safetensors.torch import load_file
from transformers import MistralConfig, MistralForCausalLM

from coordinator.initial_state import adopt_architecture, initial_state, load_pretrained
from peer.run_config import RunConfig


def save_tiny_mistral(folder) -> MistralForCausalLM:
    torch.manual_seed(1)
    hf = MistralForCausalLM(
        MistralConfig(
            vocab_size=32000,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=64,
            sliding_window=None,
        )
    )
    hf.save_pretrained(folder)
    return hf


def test_the_run_adopts_the_checkpoints_architecture_and_fresh_optimizer_state(tmp_path):
    save_tiny_mistral(tmp_path / "pretrained")
    pretrained = load_pretrained(tmp_path / "pretrained")
    run = RunConfig.from_dict({"model": {"preset": "tiny", "init_from": str(tmp_path / "pretrained")}})
    adopt_architecture(run, pretrained.config)
    assert run.model.overrides["hidden_size"] == 48 and run.model.overrides["num_attention_heads"] == 6
    assert [p.shape for p in type(pretrained)(run.model_config()).parameters()] == [
        p.shape for p in pretrained.parameters()
    ]
    state = initial_state(pretrained, run)
    assert state.epoch == 0 and all(a is not b for a, b in zip(state.parameters, pretrained.parameters()))
    # AdamW's moments start at zero, as on peers before their first step.
    assert state.optimizer_tensors and all(t.abs().max() == 0 for t in state.optimizer_tensors if t.dim() > 0)


def test_peers_of_a_new_run_start_from_the_pretrained_weights(tmp_path, write_run_config, coordinator, launch_peer):
    hf = save_tiny_mistral(tmp_path / "pretrained")
    run_toml = write_run_config(tmp_path, target_batch_size=16, lr=1e-9)
    run_toml.write_text(
        run_toml.read_text().replace('preset = "tiny"\n', f'preset = "tiny"\ninit_from = "{tmp_path / "pretrained"}"\n')
    )
    coord = coordinator(run_toml)
    assert coord.state()["checkpoint"]["epoch"] == 0
    peer = launch_peer("first", initial_peers=[coord.address], max_epochs=1, snapshots=True)
    peer.wait(timeout=240)
    assert [e["epoch"] for e in peer.events("state_loaded")] == [0]
    trained = load_file(tmp_path / "first" / "epoch-1.safetensors")
    # One step at lr 1e-9 leaves the pretrained weights as they were.
    torch.testing.assert_close(trained["embed_tokens.weight"], hf.model.embed_tokens.weight.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(trained["norm.weight"], hf.model.norm.weight.detach(), atol=1e-6, rtol=0)
