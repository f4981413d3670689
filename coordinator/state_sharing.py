"""The coordinator's place among the run's state averagers.

It joins hivemind's state-sharing protocol under the same prefix as the peers' state averagers, to
download the swarm's training state for checkpoints, and to hand out the latest checkpoint to peers
that find nobody else with state (a fresh start of a run, or a restart of the whole swarm). It never
takes part in averaging rounds.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import hivemind
import torch
from hivemind.compression import CompressionInfo, NoCompression, TensorRole

from coordinator.checkpoints import TrainingState
from peer.state_loading import DonorCheckingAverager, check_tensors


class CheckpointAverager(DonorCheckingAverager):
    """Downloads training state from peers and serves the latest checkpoint's state to them.

    Its sharing priority is just above the checkpoint's epoch: a peer at a later epoch is preferred
    as a donor, and peers starting a run from pretrained weights (a checkpoint of epoch 0) take them
    rather than another newcomer's random ones.
    """

    def __init__(self, dht: hivemind.DHT, training_key: str, parameters: Sequence[torch.Tensor], **kwargs) -> None:
        self._parameters = list(parameters)  # the run's model parameters (on meta): the shapes to expect
        self._served: TrainingState | None = None
        self._served_lock = threading.Lock()
        super().__init__(
            averaged_tensors=[torch.zeros(1)],
            dht=dht,
            prefix=f"{training_key}_state_averager",
            state_compression=NoCompression(),
            allow_state_sharing=False,
            start=True,
            **kwargs,
        )

    def check_state(self, metadata: Any, tensors: Sequence[torch.Tensor]) -> str | None:
        """The run's parameters come first, finite and of the model's shapes; peers check the rest."""
        if len(tensors) < len(self._parameters):
            return f"it sent {len(tensors)} tensors, at least {len(self._parameters)} expected"
        return check_tensors(tensors[: len(self._parameters)], self._parameters)

    def serve(self, state: TrainingState) -> None:
        """Offer `state` to peers that ask for the run's state."""
        with self._served_lock:
            self._served = state
        self.state_sharing_priority = state.epoch + 0.5
        self.allow_state_sharing = True

    def get_current_state(self):
        with self._served_lock:
            state = self._served
        assert state is not None, "state sharing is only allowed once serve() was called"
        parameter_infos = [
            CompressionInfo.from_tensor(p, key=i, role=TensorRole.PARAMETER) for i, p in enumerate(state.parameters)
        ]
        optimizer_infos = [
            CompressionInfo.from_tensor(t, key=i, role=TensorRole.OPTIMIZER)
            for i, t in enumerate(state.optimizer_tensors)
        ]
        metadata = dict(epoch=state.epoch, group_bits="", optimizer_metadata=state.optimizer_metadata)
        return metadata, [*state.parameters, *state.optimizer_tensors], [*parameter_infos, *optimizer_infos]

    def download(self, timeout: float) -> TrainingState | None:
        """The training state of the peer with the most recent epoch whose state fits the run's
        model, or None if nobody has one."""
        loaded = self.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return None
        metadata, tensors = loaded
        num_parameters = len(self._parameters)
        return TrainingState(
            epoch=metadata["epoch"],
            parameters=list(tensors[:num_parameters]),
            optimizer_tensors=list(tensors[num_parameters:]),
            optimizer_metadata=metadata.get("optimizer_metadata") or [],
        )
