"""What a spawned process does in tests/peer/test_codec.py: a module of its own, importable there
(tests/peer is on the path a spawned process inherits), unlike the test module."""

import pickle

from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2


def decode_in_this_process(pickled_codec: bytes, payload: bytes) -> list[float]:
    pickle.loads(pickled_codec)  # as a spawned averager process receives its codec
    return deserialize_torch_tensor(runtime_pb2.Tensor.FromString(payload)).tolist()
