"""Starting a run from pretrained weights: `[model] init_from = "path/to/transformers/checkpoint"`.

The coordinator converts the checkpoint (Mistral, Mixtral, BLOOM, or a Starling checkpoint), makes
the run's model config say exactly that architecture (as overrides of the preset, so peers build
the same model), and offers the weights with a freshly initialised optimizer state as the
checkpoint of epoch 0: peers joining a new run load it instead of starting from random weights.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hivemind.optim import state_averager
from hivemind.optim.state_averager import dump_optimizer_state

from coordinator.checkpoints import TrainingState
from model import CausalLM, ModelConfig
from model.adapters import load_checkpoint
from peer.optimizer import make_state_optimizer, make_state_scheduler
from peer.run_config import RunConfig, RunConfigError

# The fields that define an architecture: ModelConfig's own arguments, less the kernel choice.
ARCHITECTURE_FIELDS = [
    name
    for name, parameter in inspect.signature(ModelConfig.__init__).parameters.items()
    if name not in ("self", "kwargs", "kernels")
]


def load_pretrained(path: str | Path) -> CausalLM:
    """The weights of a transformers checkpoint directory, as a Starling model."""
    try:
        return load_checkpoint(path)
    except ValueError as error:
        raise RunConfigError(f"model.init_from: {error}") from None


def architecture_overrides(config: ModelConfig, preset: str) -> dict[str, Any]:
    """The overrides of `preset` that give `config`'s architecture."""
    base = ModelConfig.from_preset(preset)
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS if getattr(config, name) != getattr(base, name)}


def adopt_architecture(run: RunConfig, config: ModelConfig) -> None:
    """Make the run's [model] section describe `config`'s architecture (checked to rebuild it)."""
    run.model.overrides = {**run.model.overrides, **architecture_overrides(config, run.model.preset)}
    rebuilt = run.model_config()
    for name in ARCHITECTURE_FIELDS:
        if getattr(rebuilt, name) != getattr(config, name):
            raise RunConfigError(
                f"model.init_from: the run's [model] overrides {name} "
                f"to {getattr(rebuilt, name)!r}, the checkpoint has {getattr(config, name)!r}"
            )


def initial_state(model: CausalLM, run: RunConfig) -> TrainingState:
    """Epoch 0 of a run from `model`'s weights, with the optimizer state that peers' optimizers have
    before their first step (hivemind initialises it with one step on zero gradients, which
    peer.hivemind_fixes takes at a learning rate of zero)."""
    parameters = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    optimizer = make_state_optimizer(parameters, run)
    make_state_scheduler(optimizer, run)  # peers' state has its fields
    state_averager.initialize_optimizer_state_(optimizer)  # as peers do, with peer.hivemind_fixes
    metadata, tensors = dump_optimizer_state(optimizer)
    return TrainingState(
        epoch=0,
        parameters=[p.detach() for p in model.parameters()],
        optimizer_tensors=tensors,
        optimizer_metadata=metadata,
    )
