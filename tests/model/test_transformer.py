"""CausalLM behaviour: save/load through transformers' Auto classes, generation, masks, MoE loss."""

import inspect
import math

import pytest
import torch
import transformers

from model import CausalLM, ModelConfig
from model.alibi import alibi_slopes

# The tiny preset turned into a BLOOM-style model: ALiBi, LayerNorm, GELU MLP, biases.
ALIBI = dict(
    position_embedding="alibi",
    norm="layernorm",
    mlp="gelu",
    attention_bias=True,
    mlp_bias=True,
    embedding_layernorm=True,
    sliding_window=None,
)


def tiny(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset("tiny", vocab_size=97, **overrides)).eval()


@pytest.mark.parametrize("overrides", [dict(num_local_experts=3, num_experts_per_tok=2), ALIBI], ids=["moe", "alibi"])
def test_save_pretrained_round_trip_through_auto_model(tmp_path, overrides):
    model = tiny(**overrides)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 97, (2, 16))
    for loader in (CausalLM, transformers.AutoModelForCausalLM):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, CausalLM)
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    model = tiny(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    loaded = CausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()


def test_generate_with_cache_equals_greedy_decoding_without_cache():
    model = tiny(sliding_window=6)
    prompt = torch.randint(3, 97, (1, 5))
    generated = model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert generated.shape == (1, 17)
    ids = prompt
    for _ in range(12):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_sliding_window_limits_what_a_position_sees():
    model = tiny(sliding_window=4, num_hidden_layers=1)
    ids = torch.randint(0, 97, (1, 12))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 97
    before, after = model(ids).logits, model(changed).logits
    # With one layer, position 5 sees 2..5 and position 6 sees 3..6: only the former changes.
    assert not torch.allclose(before[0, 5], after[0, 5])
    torch.testing.assert_close(before[0, 6:], after[0, 6:])


def test_moe_loss_includes_weighted_aux_loss():
    model = tiny(num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    ids = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain + 0.5 * out.aux_loss)


def test_ignored_labels_do_not_count():
    model = tiny()
    ids = torch.randint(0, 97, (1, 10))
    labels = ids.clone()
    labels[0, 5:] = -100
    full = model(ids[:, :5], labels=ids[:, :5]).loss
    torch.testing.assert_close(model(ids, labels=labels).loss, full)


def test_training_mode_loss_equals_eval_mode_loss_and_skips_logits():
    model = tiny()
    ids = torch.randint(0, 97, (2, 12))
    eval_loss = model(ids, labels=ids).loss
    model.train()
    out = model(ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, eval_loss)


def masks_seen_by_attention(model: CausalLM, *args, **kwargs) -> list[torch.Tensor | None]:
    """The `mask` argument each layer's attention received during one forward (through torch's hooks)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(inspect.signature(module.forward).bind(*args, **kwargs).arguments["mask"])

    hooks = [layer.attn.register_forward_pre_hook(record, with_kwargs=True) for layer in model.layers]
    model(*args, **kwargs)
    for hook in hooks:
        hook.remove()
    return seen


def test_alibi_bias_and_padding_mask_are_built_once_per_forward_for_every_layer():
    model = tiny(**ALIBI, num_hidden_layers=3)
    ids = torch.randint(0, 97, (2, 6))
    padding = torch.ones_like(ids)
    padding[0, :2] = 0
    masks = masks_seen_by_attention(model, ids, attention_mask=padding)
    assert len(masks) == 3 and all(mask is masks[0] for mask in masks)

    distance = torch.arange(6)[:, None] - torch.arange(6)[None, :]
    causal_bias = (-alibi_slopes(4)[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))
    torch.testing.assert_close(masks[0][1], causal_bias)  # the unpadded row
    assert torch.isinf(masks[0][0, :, 2:, :2]).all()  # real tokens never see the padding


def test_plain_causal_attention_gets_no_mask():
    """Without padding, window cut or ALiBi, SDPA's is_causal path (flash attention on GPUs) needs none."""
    assert masks_seen_by_attention(tiny(), torch.randint(0, 97, (2, 6))) == [None, None]


def test_alibi_bias_takes_the_autocast_dtype():
    model = tiny(**ALIBI)
    ids = torch.randint(0, 97, (2, 8))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, attention_mask=padding).logits
    assert logits.dtype == torch.bfloat16


@pytest.mark.parametrize("overrides", [{}, dict(num_local_experts=2), ALIBI], ids=["dense", "moe", "alibi"])
def test_residual_projections_start_smaller_by_the_square_root_of_twice_the_depth(overrides):
    """Attention output and MLP down projections (every expert's too) draw std / sqrt(2 * layers)."""
    layers = 8
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=4,
        **overrides,
    )
    model = CausalLM(config)
    std = config.initializer_range
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        residual = name.endswith(("o_proj.weight", "down_proj.weight", "mlp.down_proj"))
        expected = std / math.sqrt(2 * layers) if residual else std
        # A sample std of n normal draws is off by about 1/sqrt(2n) relatively: allow five times that.
        assert param.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * param.numel())), name
