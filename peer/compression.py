"""Wire formats for all-reduce: 8 (or 4) bits for large gradient tensors, 16 bits for small ones, 32 for state."""

from __future__ import annotations

from collections.abc import Callable

from hivemind.compression import CompressionBase, Float16Compression, NoCompression, SizeAdaptiveCompression

from peer.codec import Blockwise4Bit, Blockwise8Bit
from peer.run_config import AveragingSection, DilocoSection


def gradient_compression(averaging: AveragingSection) -> CompressionBase:
    """The codec for gradients named by the run config (see codec_named)."""
    return codec_named(averaging.compression, averaging.compression_threshold)


def pseudo_gradient_compression(diloco: DilocoSection, averaging: AveragingSection) -> CompressionBase:
    """The codec for DiLoCo's pseudo-gradients named by the run config (see codec_named)."""
    return codec_named(diloco.compression, averaging.compression_threshold)


def _size_adaptive(large: type[CompressionBase]) -> Callable[[int], CompressionBase]:
    return lambda threshold: SizeAdaptiveCompression(
        threshold=threshold, less=Float16Compression(), greater_equal=large()
    )


# The codecs a run config may name, each made for the run's compression_threshold.
CODECS: dict[str, Callable[[int], CompressionBase]] = {
    "adaptive-8bit": _size_adaptive(Blockwise8Bit),
    "blockwise-4bit": _size_adaptive(Blockwise4Bit),
    "fp16": lambda threshold: Float16Compression(),
    "none": lambda threshold: NoCompression(),
}


def codec_named(name: str, threshold: int) -> CompressionBase:
    """A codec of the run config for tensors to average.

    "adaptive-8bit" sends tensors of at least compression_threshold values with Starling's 8-bit
    blockwise codec (peer.codec: relative error about 0.007 on normal data) and smaller ones,
    norms and biases mostly, in fp16. Blockwise scaling matters: on a mostly-zero tensor with a
    few large values, hivemind's uniform 8-bit codec lost 51% of the signal (relative L2 error)
    and a two-peer run diverged with it.
    "blockwise-4bit" is the same with peer.codec's 4-bit codec for large tensors (relative error
    about 0.1: for pseudo-gradients sent with error feedback).
    """
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}: one of {', '.join(CODECS)}")
    return CODECS[name](threshold)


def state_compression() -> CompressionBase:
    """Parameters and optimizer state travel in full precision. In 16 bits, Adam's second moments
    of rarely-seen embedding rows (about 1e-10) round to zero, the next step divides by eps alone
    and the weights jump by several units: peers at the same epoch ended up 7.5 apart."""
    return NoCompression()
