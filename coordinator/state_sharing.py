"""The coordinator's place among the run's state averagers.

It joins hivemind's state-sharing protocol under the same prefix as the peers' state averagers, to
download the swarm's training state for checkpoints, and to hand out the latest checkpoint to peers
that find nobody else with state (a fresh start of a run, or a restart of the whole swarm). It never
takes part in averaging rounds.
"""

from __future__ import annotations

import threading

import hivemind
import torch
from hivemind.compression import CompressionInfo, NoCompression, TensorRole
from hivemind.optim.state_averager import TrainingStateAverager

from coordinator.checkpoints import TrainingState


class CheckpointAverager(hivemind.DecentralizedAverager):
    """Downloads training state from peers and serves the latest checkpoint's state to them.

    Its sharing priority is just above the checkpoint's epoch: a peer at a later epoch is preferred
    as a donor, and peers starting a run from pretrained weights (a checkpoint of epoch 0) take them
    rather than another newcomer's random ones.
    """

    def __init__(self, dht: hivemind.DHT, training_key: str, **kwargs) -> None:
        self._served: TrainingState | None = None
        self._served_lock = threading.Lock()
        super().__init__(
            averaged_tensors=[torch.zeros(1)], dht=dht, prefix=f"{training_key}_state_averager",
            state_compression=NoCompression(), allow_state_sharing=False, start=True, **kwargs,
        )

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names its RPC handlers after the class: answer and call as the peers' state averagers do.
        return TrainingStateAverager._get_handle_name(namespace, method_name)

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
        parameter_infos = [CompressionInfo.from_tensor(p, key=i, role=TensorRole.PARAMETER)
                           for i, p in enumerate(state.parameters)]
        optimizer_infos = [CompressionInfo.from_tensor(t, key=i, role=TensorRole.OPTIMIZER)
                           for i, t in enumerate(state.optimizer_tensors)]
        metadata = dict(epoch=state.epoch, group_bits="", optimizer_metadata=state.optimizer_metadata)
        return metadata, [*state.parameters, *state.optimizer_tensors], [*parameter_infos, *optimizer_infos]

    def download(self, num_parameters: int, timeout: float) -> TrainingState | None:
        """The training state of the peer with the most recent epoch, or None if nobody has one."""
        loaded = self.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return None
        metadata, tensors = loaded
        if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int) or len(tensors) < num_parameters:
            return None
        return TrainingState(
            epoch=metadata["epoch"],
            parameters=list(tensors[:num_parameters]),
            optimizer_tensors=list(tensors[num_parameters:]),
            optimizer_metadata=metadata.get("optimizer_metadata") or [],
        )
