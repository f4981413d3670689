"""The codecs peers average with, as the run config names them."""

import torch
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from peer.codec import MAGIC
from peer.compression import gradient_compression
from peer.run_config import AveragingSection


def test_adaptive_8bit_sends_large_tensors_in_starlings_format_and_small_ones_in_fp16():
    compression = gradient_compression(AveragingSection(compression="adaptive-8bit", compression_threshold=4096))
    large, small = torch.randn(64, 64), torch.randn(4095)
    large_message = compression.compress(large, CompressionInfo.from_tensor(large))
    small_message = compression.compress(small, CompressionInfo.from_tensor(small))
    assert large_message.compression == runtime_pb2.BLOCKWISE_8BIT and large_message.buffer[:4] == MAGIC
    assert len(large_message.buffer) < 1.04 * large.numel() + 16
    assert small_message.compression == runtime_pb2.FLOAT16
    for message, x, tolerance in [(large_message, large, 0.01), (small_message, small, 1e-3)]:
        decoded = deserialize_torch_tensor(message)
        assert decoded.shape == x.shape and ((decoded - x).norm() / x.norm()) < tolerance


def test_fp16_and_none():
    x = torch.randn(100_000)
    for name, kind in [("fp16", runtime_pb2.FLOAT16), ("none", runtime_pb2.NONE)]:
        message = gradient_compression(AveragingSection(compression=name)).compress(x, CompressionInfo.from_tensor(x))
        assert message.compression == kind
