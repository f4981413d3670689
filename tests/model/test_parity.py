"""Parity with transformers: from_hf copies a tiny random model; logits, losses and gradients match."""

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

from model import CausalLM, from_hf

VOCAB, SEQ, BATCH = 101, 24, 2


def tiny_mistral():
    return MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            sliding_window=7,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
    )


def tiny_mixtral():
    return MixtralForCausalLM(
        MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=48,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            max_position_embeddings=64,
            output_router_logits=True,
            router_aux_loss_coef=0.05,
            attn_implementation="eager",
        )
    )


def tiny_bloom():
    return BloomForCausalLM(
        BloomConfig(
            vocab_size=VOCAB,
            hidden_size=60,
            n_layer=2,
            n_head=6,
            attn_implementation="eager",
        )
    )


BUILDERS = {"mistral": tiny_mistral, "mixtral": tiny_mixtral, "bloom": tiny_bloom}


def our_grad_name(hf_name: str, ours: CausalLM) -> str:
    """Map a few easily comparable parameters (same layout on both sides)."""
    mapping = {
        "model.embed_tokens.weight": "embed_tokens.weight",
        "transformer.word_embeddings.weight": "embed_tokens.weight",
        "model.norm.weight": "norm.weight",
        "transformer.ln_f.weight": "norm.weight",
        "model.layers.1.self_attn.o_proj.weight": "layers.1.attn.o_proj.weight",
        "transformer.h.1.self_attention.dense.weight": "layers.1.attn.o_proj.weight",
        "model.layers.0.mlp.gate.weight": "layers.0.mlp.router.weight",
        "model.layers.0.mlp.experts.down_proj": "layers.0.mlp.down_proj",
        "model.layers.0.mlp.down_proj.weight": "layers.0.mlp.down_proj.weight",
        "transformer.h.0.mlp.dense_4h_to_h.weight": "layers.0.mlp.down_proj.weight",
    }
    return mapping.get(hf_name)


@pytest.mark.parametrize("arch", BUILDERS)
def test_logits_loss_and_gradients_match_transformers(arch):
    torch.manual_seed(0)
    hf = BUILDERS[arch]().eval()
    ours = from_hf(hf).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))

    hf_out = hf(ids, labels=ids)
    our_out = ours(ids, labels=ids)
    torch.testing.assert_close(our_out.logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_out.loss, hf_out.loss, atol=1e-5, rtol=1e-5)
    if arch == "mixtral":
        torch.testing.assert_close(our_out.aux_loss, hf_out.aux_loss, atol=1e-5, rtol=1e-5)
        assert 1.5 < our_out.aux_loss.item() < 3.0  # about top_k for a near-balanced random router

    hf_out.loss.backward()
    our_out.loss.backward()
    ours_params = dict(ours.named_parameters())
    compared = 0
    for name, param in hf.named_parameters():
        mine = our_grad_name(name, ours)
        if mine is None:
            continue
        torch.testing.assert_close(ours_params[mine].grad, param.grad, atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared >= 4


@pytest.mark.parametrize("arch", BUILDERS)
def test_padded_batch_matches_transformers(arch):
    """Left padding, as in batched generation: real positions agree with transformers."""
    torch.manual_seed(1)
    hf = BUILDERS[arch]().eval()
    ours = from_hf(hf).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hf_logits = hf(ids, attention_mask=mask, position_ids=positions).logits
    our_logits = ours(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(our_logits[real], hf_logits[real], atol=1e-5, rtol=1e-5)


def test_from_hf_reads_a_saved_directory(tmp_path):
    torch.manual_seed(2)
    hf = tiny_mistral().eval()
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (1, SEQ))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_from_hf_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_hf(tmp_path / "missing")
