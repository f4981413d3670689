"""The codecs peers average with, as the run config names them."""

import pytest
import torch
from hivemind.compression import CompressionBase, CompressionInfo, deserialize_torch_tensor
from hivemind.proto import runtime_pb2

from peer.codec import MAGIC
from peer.compression import CODECS, codec_named, gradient_compression
from peer.optimizer import INNER_OPTIMIZERS, inner_optimizer_class
from peer.run_config import COMPRESSIONS, OPTIMIZERS, PSEUDO_GRADIENT_COMPRESSIONS, AveragingSection


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


def test_every_codec_and_optimizer_a_run_config_may_name_exists():
    """The run config's lists of choices and the registries that implement them agree: a name the
    config accepts always builds, and a name it refuses is not built silently either."""
    assert set(COMPRESSIONS) | set(PSEUDO_GRADIENT_COMPRESSIONS) == set(CODECS)
    for name in CODECS:
        assert isinstance(codec_named(name, threshold=2**16), CompressionBase)
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        codec_named("int3", threshold=2**16)
    assert set(OPTIMIZERS) == set(INNER_OPTIMIZERS)
    for name in OPTIMIZERS:
        assert issubclass(inner_optimizer_class(name), torch.optim.Optimizer)
