"""The small model and batches the kernel tests train, under any kernels mode."""

import torch

from model import CausalLM, ModelConfig

VOCAB, BATCH, SEQ, STEPS = 128, 2, 16, 20


def build(mode: str, state: dict | None = None) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(
        ModelConfig.from_preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, kernels=mode)
    )
    if state is not None:
        model.load_state_dict(state)
    return model.train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[:, -3:] = -100
    return ids, labels
