"""8-bit blockwise codec: the reference's byte layout and error bound, and the kernels' identical bytes."""

import pytest
import torch

from model import kernels
from model.kernels.quantize import dequantize_blockwise_reference, packed_size, quantize_blockwise_reference

SIZES = [1, 255, 257, 1000, 70_000]  # one value; short last blocks; several programs


@pytest.mark.parametrize("numel", SIZES)
def test_reference_layout_and_error_bound(numel):
    torch.manual_seed(0)
    x = torch.randn(numel) * torch.rand(numel) * 10
    packed = quantize_blockwise_reference(x)
    blocks = -(-numel // 256)
    assert packed.dtype == torch.uint8 and packed.numel() == 4 * blocks + numel == packed_size(numel)
    absmax = packed[: 4 * blocks].view(torch.float32)
    codes = packed[4 * blocks :].view(torch.int8)
    padded = torch.nn.functional.pad(x, (0, blocks * 256 - numel)).view(blocks, 256)
    torch.testing.assert_close(absmax, padded.abs().amax(1), atol=0, rtol=0)
    assert codes.abs().max() == 127
    decoded = dequantize_blockwise_reference(packed, numel)
    step = (absmax / 127).repeat_interleave(256)[:numel]
    assert ((decoded - x).abs() <= step / 2 * (1 + 1e-6)).all()


def test_bytes_per_value_and_special_blocks():
    assert packed_size(1 << 20) / (1 << 20) <= 1.04
    x = torch.zeros(3 * 256)
    x[256:512] = torch.linspace(-1, 1, 256)
    x[600] = float("nan")
    decoded = dequantize_blockwise_reference(quantize_blockwise_reference(x), x.numel())
    assert (decoded[:256] == 0).all()  # an all-zero block stays zero
    torch.testing.assert_close(decoded[256:512], x[256:512], atol=1 / 254, rtol=0)
    assert decoded[512:].isnan().all()  # a non-finite value poisons its block, visibly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("numel", SIZES)
def test_kernels_produce_the_reference_bytes(numel, dtype):
    torch.manual_seed(0)
    x = (torch.randn(numel) * 5).to(dtype)
    x[: min(numel, 256) // 2] = 0
    packed = kernels.quantize_blockwise(x, mode="triton")
    assert torch.equal(packed, quantize_blockwise_reference(x))
    decoded = kernels.dequantize_blockwise(packed, numel, dtype=dtype, mode="triton")
    assert decoded.dtype == dtype
    expected = dequantize_blockwise_reference(packed, numel, dtype=dtype)
    if dtype == torch.bfloat16:  # the interpreter truncates fp32 to bf16 where GPUs round: one ulp
        torch.testing.assert_close(decoded, expected, atol=0, rtol=2**-7)
    else:
        assert torch.equal(decoded, expected)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf * 0 inside the interpreter
def test_kernels_handle_nan_like_reference():
    x = torch.randn(600)
    x[300] = float("inf")
    packed = kernels.quantize_blockwise(x, mode="triton")
    assert torch.equal(packed, quantize_blockwise_reference(x))
    assert kernels.dequantize_blockwise(packed, 600, mode="triton")[256:512].isnan().all()


def test_wrong_buffer_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        kernels.dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), 100, mode="torch")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_out_receives_the_same_bytes(mode):
    torch.manual_seed(0)
    x = torch.randn(1000)
    buffer = torch.full((16 + packed_size(1000),), 7, dtype=torch.uint8)
    returned = kernels.quantize_blockwise(x, mode=mode, out=buffer[16:])
    assert returned.data_ptr() == buffer[16:].data_ptr()
    assert torch.equal(buffer[16:], quantize_blockwise_reference(x)) and (buffer[:16] == 7).all()
    with pytest.raises(ValueError, match=f"{packed_size(1000)} bytes"):
        kernels.quantize_blockwise(x, mode=mode, out=buffer)


@pytest.mark.parametrize("mode", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_into_out_gives_the_same_values(mode, dtype):
    torch.manual_seed(0)
    packed = quantize_blockwise_reference(torch.randn(1000))
    out = torch.full((1000,), float("nan"), dtype=dtype)
    returned = kernels.dequantize_blockwise(packed, 1000, dtype=dtype, mode=mode, out=out)
    assert returned.data_ptr() == out.data_ptr()
    assert torch.equal(out, kernels.dequantize_blockwise(packed, 1000, dtype=dtype, mode=mode))
    with pytest.raises(ValueError, match="1000 values"):
        kernels.dequantize_blockwise(packed, 1000, dtype=dtype, mode=mode, out=torch.empty(999, dtype=dtype))
