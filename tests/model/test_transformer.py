"""CausalLM behaviour: save/load through transformers' Auto classes, generation, masks, MoE loss."""

import torch
import transformers

from model import CausalLM, ModelConfig


def tiny(**overrides) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset("tiny", vocab_size=97, **overrides)).eval()


def test_save_pretrained_round_trip_through_auto_model(tmp_path):
    model = tiny(num_local_experts=3, num_experts_per_tok=2)
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
