"""Wire formats for all-reduce: 8 bits for large gradient tensors, 16 bits for small ones, 32 for state."""

from __future__ import annotations

from hivemind.compression import CompressionBase, Float16Compression, NoCompression, SizeAdaptiveCompression

from peer.codec import Blockwise8Bit
from peer.run_config import AveragingSection


def gradient_compression(averaging: AveragingSection) -> CompressionBase:
    """The codec for gradients named by the run config.

    "adaptive-8bit" sends tensors of at least compression_threshold values with Starling's 8-bit
    blockwise codec (peer.codec: relative error about 0.007 on normal data) and smaller ones,
    norms and biases mostly, in fp16. Blockwise scaling matters: on a mostly-zero tensor with a
    few large values, hivemind's uniform 8-bit codec lost 51% of the signal (relative L2 error)
    and a two-peer run diverged with it.
    """
    if averaging.compression == "adaptive-8bit":
        return SizeAdaptiveCompression(
            threshold=averaging.compression_threshold, less=Float16Compression(), greater_equal=Blockwise8Bit()
        )
    if averaging.compression == "fp16":
        return Float16Compression()
    return NoCompression()


def state_compression() -> CompressionBase:
    """Parameters and optimizer state travel in full precision. In 16 bits, Adam's second moments
    of rarely-seen embedding rows (about 1e-10) round to zero, the next step divides by eps alone
    and the weights jump by several units: peers at the same epoch ended up 7.5 apart."""
    return NoCompression()
