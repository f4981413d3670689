"""Starling's 8-bit and 4-bit blockwise codecs through hivemind's own serialize/deserialize path."""

import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from codec_child import decode_in_this_process
from hivemind.compression import (
    BlockwiseQuantization,
    CompressionInfo,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialization,
    serialize_torch_tensor,
)
from hivemind.proto import runtime_pb2

from model.kernels import dequantize_blockwise, guard, quantize_blockwise
from peer.codec import (
    MAGIC,
    MAGIC_4BIT,
    Blockwise4Bit,
    Blockwise8Bit,
    is_starling_payload,
    read_back_problem,
    register,
)

register()


def round_trip(x: torch.Tensor, codec: Blockwise8Bit | None = None) -> tuple[torch.Tensor, runtime_pb2.Tensor]:
    message = (codec or Blockwise8Bit()).compress(x, CompressionInfo.from_tensor(x))
    received = runtime_pb2.Tensor.FromString(message.SerializeToString())
    return deserialize_torch_tensor(received), message


def relative_error(decoded: torch.Tensor, x: torch.Tensor) -> float:
    return ((decoded.float() - x.float()).norm() / x.float().norm()).item()


def test_register_is_idempotent_and_keeps_the_previous_decoder():
    entry = serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"]
    register()
    assert serialization._BASE_COMPRESSION_TYPES["BLOCKWISE_8BIT"] is entry
    assert isinstance(entry.previous, BlockwiseQuantization)


def test_normal_data_error_and_bytes_per_value():
    torch.manual_seed(0)
    x = torch.randn(1 << 20)
    decoded, message = round_trip(x)
    assert message.compression == runtime_pb2.BLOCKWISE_8BIT and message.buffer[:4] == MAGIC
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    assert relative_error(decoded, x) < 0.01
    assert len(message.buffer) / x.numel() <= 1.04
    # the payload is the packed format of model.kernels.quantize behind the header
    assert torch.equal(torch.frombuffer(bytearray(message.buffer[16:]), dtype=torch.uint8), quantize_blockwise(x))


def test_tensors_beyond_the_reused_buffers(monkeypatch):
    """Over 32 MiB decoded (memory given huge pages) and a payload over the per-thread scratch."""
    monkeypatch.setattr("peer.codec._SCRATCH_LIMIT", 1 << 20)
    torch.manual_seed(0)
    x = torch.randn(9_000_001)
    decoded, message = round_trip(x)
    assert torch.equal(torch.frombuffer(bytearray(message.buffer[16:]), dtype=torch.uint8), quantize_blockwise(x))
    assert torch.equal(decoded, dequantize_blockwise(quantize_blockwise(x), x.numel()))


@pytest.mark.parametrize("numel", [1, 255, 257, 1_000_003])
def test_odd_sizes(numel):
    torch.manual_seed(numel)
    x = torch.randn(numel)
    decoded, _ = round_trip(x)
    assert decoded.shape == x.shape
    absmax = torch.nn.functional.pad(x, (0, -numel % 256)).view(-1, 256).abs().amax(1)
    step = absmax.repeat_interleave(256)[:numel] / 127
    assert ((decoded - x).abs() <= step / 2 * (1 + 1e-6)).all()


def test_shapes_zeros_and_empty():
    x = torch.randn(3, 5, 7)
    decoded, _ = round_trip(x)
    assert decoded.shape == (3, 5, 7) and relative_error(decoded, x) < 0.01
    zeros, _ = round_trip(torch.zeros(1000))
    assert torch.equal(zeros, torch.zeros(1000))
    empty, _ = round_trip(torch.zeros(0, 4))
    assert empty.shape == (0, 4)


def test_huge_values_stay_in_their_block():
    torch.manual_seed(1)
    x = torch.randn(4096)
    x[300] = 1e6
    x[3000] = -1e8
    decoded, _ = round_trip(x)
    polluted = torch.zeros(4096, dtype=torch.bool)
    polluted[256:512] = polluted[2816:3072] = True
    assert relative_error(decoded[~polluted], x[~polluted]) < 0.01
    assert decoded[300] == pytest.approx(1e6, rel=1e-6) and decoded[3000] == pytest.approx(-1e8, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_comes_back_in_its_dtype(dtype):
    torch.manual_seed(2)
    x = torch.randn(10, 300).to(dtype)
    decoded, message = round_trip(x)
    assert decoded.dtype == dtype and decoded.shape == x.shape
    assert relative_error(decoded, x) < 0.01
    assert len(message.buffer) <= 16 + 1.04 * x.numel()


def test_non_finite_value_poisons_only_its_block():
    x = torch.randn(1000)
    x[300] = float("inf")
    x[900] = float("nan")
    decoded, _ = round_trip(x)
    assert decoded[256:512].isnan().all() and decoded[768:].isnan().all()
    assert decoded[:256].isfinite().all() and decoded[512:768].isfinite().all()


def test_requires_grad_survives():
    x = torch.randn(600, requires_grad=True)
    decoded, _ = round_trip(x)
    assert decoded.requires_grad and not decoded.grad_fn


def test_bitsandbytes_payloads_still_decode():
    torch.manual_seed(3)
    x = torch.randn(100_000)
    message = BlockwiseQuantization().compress(x, CompressionInfo.from_tensor(x))
    assert not is_starling_payload(message.buffer)
    assert relative_error(deserialize_torch_tensor(message), x) < 0.02


def test_the_registry_encodes_in_starling_format():
    # hivemind's reducers send averaged parts back this way, with the compression type of the part
    torch.manual_seed(3)
    x = torch.randn(100_000)
    via_registry = serialize_torch_tensor(x, runtime_pb2.BLOCKWISE_8BIT)
    assert is_starling_payload(via_registry.buffer)
    assert relative_error(deserialize_torch_tensor(via_registry), x) < 0.01


def test_compression_ratio_and_bad_payloads():
    codec = Blockwise8Bit()
    x = torch.randn(1000)
    assert codec.estimate_compression_ratio(CompressionInfo.from_tensor(x)) == pytest.approx((1 + 4 / 256) / 4)
    message = codec.compress(x, CompressionInfo.from_tensor(x))
    with pytest.raises(ValueError, match="does not match"):
        codec.extract(runtime_pb2.Tensor(buffer=message.buffer[:-1], size=[1000], dtype="float32"))
    with pytest.raises(ValueError, match="does not support"):
        codec.compress(torch.arange(10), CompressionInfo.from_tensor(torch.arange(10)))


def test_each_message_keeps_its_own_bytes():
    """Payloads are assembled in a reused buffer: a later compress must not change an earlier message."""
    codec = Blockwise8Bit()
    first, second = torch.randn(5000), torch.randn(300) * 100
    message = codec.compress(first, CompressionInfo.from_tensor(first))
    before = bytes(message.buffer)
    codec.compress(second, CompressionInfo.from_tensor(second))
    codec.compress(torch.randn(20_000), CompressionInfo.from_tensor(torch.randn(20_000)))
    assert message.buffer == before
    assert relative_error(deserialize_torch_tensor(message), first) < 0.01


def test_a_process_that_unpickles_the_codec_decodes_its_payloads():
    x = torch.randn(1000)
    message = Blockwise8Bit().compress(x, CompressionInfo.from_tensor(x))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        work = pool.submit(decode_in_this_process, pickle.dumps(Blockwise8Bit()), message.SerializeToString())
        decoded = work.result(timeout=120)
    assert relative_error(torch.tensor(decoded), x) < 0.01


@pytest.mark.parametrize("numel", [1, 63, 64, 65, 1_000_003])
def test_4bit_round_trip_error_bytes_and_idempotence(numel):
    """4.5 bits a value and a relative error about 0.1 on normal data; what it decodes it encodes
    again unchanged (error feedback relies on it: what a peer keeps is what its reducer gets)."""
    torch.manual_seed(numel)
    x = torch.randn(numel)
    codec = Blockwise4Bit()
    message = runtime_pb2.Tensor.FromString(codec.compress(x, CompressionInfo.from_tensor(x)).SerializeToString())
    decoded = deserialize_torch_tensor(message)
    assert message.compression == runtime_pb2.UNIFORM_8BIT and message.buffer[:4] == MAGIC_4BIT
    assert decoded.shape == x.shape and decoded.dtype == x.dtype
    if numel >= 1000:
        assert relative_error(decoded, x) < 0.12
        assert len(message.buffer) / numel <= 4.6 / 8
    again = deserialize_torch_tensor(codec.compress(decoded, CompressionInfo.from_tensor(decoded)))
    assert torch.equal(again, decoded)


def test_4bit_leaves_hivemind_uniform_8bit_payloads_to_hivemind():
    torch.manual_seed(5)
    x = torch.randn(10_000)
    message = Uniform8BitQuantization().compress(x, CompressionInfo.from_tensor(x))
    assert relative_error(deserialize_torch_tensor(message), x) < 0.05
    via_registry = serialize_torch_tensor(x, runtime_pb2.UNIFORM_8BIT)  # reducers send parts back this way
    assert via_registry.buffer[:4] == MAGIC_4BIT


@pytest.fixture
def fresh_guard():
    """Nothing checked and no kernel faults, before and after."""
    guard.declare_faults(guard.KernelFaults())
    yield
    guard.declare_faults(guard.KernelFaults())


def test_a_payload_that_does_not_read_back_is_never_sent(fresh_guard, caplog):
    """The Triton quantiser (interpreted here) garbles its output beyond the slice the kernel
    guard probes: the codec reads the payload back, replaces the kernel by the reference with one
    warning, and sends the reference's payload instead, then and afterwards."""
    torch.manual_seed(0)
    x = torch.randn(5000)  # more than the guard's probe
    reference = Blockwise8Bit(kernels="torch").compress(x, CompressionInfo.from_tensor(x)).buffer
    kernel = Blockwise8Bit(kernels="checked")
    assert kernel.compress(x, CompressionInfo.from_tensor(x)).buffer == reference  # a right kernel: same bytes
    assert guard.fallbacks() == {}

    guard.declare_faults(guard.KernelFaults(garbled=frozenset({"quantize_blockwise"})))
    garbled = bytearray(quantize_blockwise(x, mode="checked").numpy().tobytes())
    assert garbled != reference[16:]  # the fault gets past the guard's probe
    with caplog.at_level("WARNING", logger="starling.model"):
        for _ in range(2):
            assert kernel.compress(x, CompressionInfo.from_tensor(x)).buffer == reference
    assert list(guard.fallbacks()) == ["quantize_blockwise on cpu"]
    assert "does not read back" in guard.fallbacks()["quantize_blockwise on cpu"]
    assert len([record for record in caplog.records if "quantize_blockwise" in record.getMessage()]) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_read_back_bound_holds_for_the_codec_and_fails_for_one_code_off(dtype):
    torch.manual_seed(1)
    x = (torch.randn(4099) * torch.logspace(-3, 3, 4099)).to(dtype)
    x[100] = float("inf")  # its block has no scale; the others are held to theirs
    decoded, message = round_trip(x)
    assert read_back_problem(decoded, x, 256, 127) is None
    payload = bytearray(message.buffer)
    absmax_bytes = 16 + 4 * -(-x.numel() // 256)
    payload[absmax_bytes + 3000] = (payload[absmax_bytes + 3000] + 2) % 256  # one code two steps away
    off = dequantize_blockwise(torch.frombuffer(payload[16:], dtype=torch.uint8), x.numel(), dtype=dtype)
    problem = read_back_problem(off, x, 256, 127)
    assert problem is not None and problem.startswith(f"1 of {x.numel()} values off by up to ")
    assert float(problem.split()[-3]) > 1  # two steps from a code at most half a step (plus rounding) away
