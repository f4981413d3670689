"""to_hf: a CausalLM exported back to transformers (Mistral, Mixtral, BLOOM) keeps its weights and logits."""

import pytest
import torch

from model import CausalLM, ModelConfig, from_hf, to_hf
from model.adapters import ADAPTERS
from tests.model.test_parity import BATCH, BUILDERS, SEQ, VOCAB


@pytest.mark.parametrize("arch", BUILDERS)
def test_from_hf_then_to_hf_gives_back_the_same_model(arch):
    torch.manual_seed(0)
    hf = BUILDERS[arch]().eval()
    back = to_hf(from_hf(hf)).eval()
    assert type(back) is type(hf)
    expected, actual = hf.state_dict(), back.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", BUILDERS)
def test_exported_starling_model_computes_the_same_logits_and_loss(arch):
    """A model initialised by Starling (not read from transformers); logits with left padding."""
    torch.manual_seed(1)
    ours = CausalLM(ADAPTERS[arch].config_from_hf(BUILDERS[arch]().config)).eval()
    exported = to_hf(ours).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    padding = torch.ones_like(ids)
    padding[0, :5] = 0
    real = padding.bool()
    ours_logits, their_logits = ours(ids, attention_mask=padding).logits, exported(ids, attention_mask=padding).logits
    torch.testing.assert_close(ours_logits[real], their_logits[real], atol=1e-5, rtol=1e-5)
    # Mixtral's loss includes the weighted load-balancing loss on both sides.
    torch.testing.assert_close(ours(ids, labels=ids).loss, exported(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
    assert to_hf(ours.to(torch.bfloat16)).dtype == torch.bfloat16


def test_to_hf_names_what_the_target_architecture_cannot_express():
    model = CausalLM(ModelConfig.from_preset("tiny", vocab_size=VOCAB, norm="layernorm", mlp_bias=True))
    with pytest.raises(ValueError, match=r"mistral cannot express .*norm='layernorm'.*mlp_bias=True"):
        to_hf(model)
