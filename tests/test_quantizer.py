"""The reference quantizer: the formula, half-step round trips, SQNR bounds, packing, fake-quant, modules."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.quantizer import (
    Granularity,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    dequantize,
    fake_quant,
    pack_codes,
    quantize,
    sqnr_db,
    unpack_codes,
)


def test_asymmetric_codes_follow_the_formula():
    torch.manual_seed(0)
    x = torch.randn(5, 7) * 3 + 1
    for bits in (2, 3, 4, 8):
        spec = QuantSpec(bits=bits, symmetric=False, granularity=Granularity.PER_TENSOR)
        qt = quantize(x, spec)
        lo, hi = x.min(), x.max()
        expected = torch.round((x - lo) / (hi - lo) * (2**bits - 1))
        assert qt.q.dtype == torch.uint8
        assert torch.equal(qt.q.float(), expected)
        assert int(qt.q.max()) == 2**bits - 1 and int(qt.q.min()) == 0  # the extremes map to the end codes
        scale = (hi - lo) / (2**bits - 1)
        torch.testing.assert_close(qt.dequantize(), expected * scale + lo)


def test_symmetric_codes_follow_the_formula():
    torch.manual_seed(1)
    x = torch.randn(6, 10)
    spec = QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL)
    qt = quantize(x, spec)
    scale = x.abs().amax(dim=1) / 127
    expected = torch.round(x / scale[:, None])
    assert qt.q.dtype == torch.int8
    assert torch.equal(qt.q.float(), expected)
    torch.testing.assert_close(qt.dequantize(), expected * scale[:, None])
    assert quantize(torch.zeros(3, 4), spec).dequantize().abs().max() == 0  # zero rows stay exactly zero


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity,axis", [("per-tensor", 0), ("per-channel", 0), ("per-channel", 1),
                                              ("per-group", 0)])
def test_round_trip_is_within_half_a_step(bits, symmetric, granularity, axis):
    torch.manual_seed(bits)
    x = torch.randn(8, 64) * torch.logspace(-2, 1, 8)[:, None]
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=Granularity(granularity), group_size=16, axis=axis)
    qt = quantize(x, spec)
    err = (qt.dequantize() - x).abs()
    # Broadcast each row's scale back onto the values it covers.
    step = dequantize(torch.ones_like(qt.q), qt.scale, None, spec)
    assert qt.q.shape == x.shape
    assert bool((err <= step / 2 + 1e-6).all()), f"max error {(err - step / 2).max():.3g} above half a step"


def _scaled_linear(rows: int = 512, cols: int = 256, seed: int = 0) -> nn.Linear:
    """A Linear whose rows differ in magnitude by 1000x, as trained weights often do."""
    torch.manual_seed(seed)
    lin = nn.Linear(cols, rows)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-1.5, 1.5, rows)[torch.randperm(rows)][:, None])
    return lin


def test_integer_zero_point_keeps_zero_exact():
    x = torch.tensor([[0.3, 1.7, 2.9, 0.0, 1.1]])
    spec = QuantSpec(bits=8, symmetric=False, granularity=Granularity.PER_TENSOR, integer_zero_point=True)
    qt = quantize(x, spec)
    assert qt.dequantize()[0, 3] == 0  # padding stays exactly zero
    assert float(qt.offset / qt.scale) == round(float(qt.offset / qt.scale))  # whole number of steps
    assert float(qt.scale) == pytest.approx(2.9 / 255)  # the range was widened to include 0
    plain = quantize(x, QuantSpec(bits=8, symmetric=False, granularity=Granularity.PER_TENSOR))
    assert float(plain.scale) == pytest.approx((2.9 - 0.0) / 255) and plain.dequantize()[0, 3] == 0


def test_sqnr_of_linear_outputs_int8_per_channel_and_int4_per_group():
    lin = _scaled_linear()
    x = torch.randn(64, 256)
    ref = lin(x)

    def out_sqnr(spec: QuantSpec) -> float:
        return sqnr_db(ref, F.linear(x, quantize(lin.weight, spec).dequantize(), lin.bias))

    int8_channel = out_sqnr(QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL))
    int4_group = out_sqnr(QuantSpec(bits=4, symmetric=False, granularity=Granularity.PER_GROUP, group_size=32))
    int8_tensor = out_sqnr(QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_TENSOR))
    assert int8_channel > 30
    assert int4_group > 15
    # One scale for rows 1000x apart wastes most codes on the small rows: per channel must be far better.
    assert int8_channel > int8_tensor + 5
    assert out_sqnr(QuantSpec(bits=2, symmetric=False, granularity=Granularity.PER_GROUP, group_size=32)) < int4_group


def test_sqnr_helper():
    ref = torch.ones(100)
    assert sqnr_db(ref, ref.clone()) == math.inf
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise power 1% of the signal


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_and_unpack_codes(bits):
    torch.manual_seed(0)
    q = torch.randint(0, 2**bits, (6, 32), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q)


def test_fake_quant_forward_is_quantized_and_gradient_passes_straight_through():
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    spec = QuantSpec(bits=4, symmetric=False, granularity=Granularity.PER_TENSOR)
    y = fake_quant(x, spec)
    assert torch.allclose(y, quantize(x.detach(), spec).dequantize())
    assert not torch.allclose(y, x)
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(4, 16))  # identity gradient (STE)


def test_quant_linear_runs_the_dequantized_weight_and_packs_int4():
    lin = _scaled_linear(64, 32)
    spec = QuantSpec(bits=4, symmetric=False, granularity=Granularity.PER_GROUP, group_size=16)
    qlin = QuantLinear.from_linear(lin, spec)
    assert qlin.qweight.dtype == torch.uint8 and qlin.qweight.numel() == 64 * 32 // 2  # two codes per byte
    x = torch.randn(3, 5, 32)
    expected = F.linear(x, quantize(lin.weight, spec).dequantize(), lin.bias)
    torch.testing.assert_close(qlin(x), expected)
    sym = QuantLinear.from_linear(lin, QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL))
    assert torch.equal(sym.codes(), quantize(lin.weight, sym.spec).q)  # int8 codes survive the unsigned storage


def test_quant_embedding_dequantizes_only_looked_up_rows():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, padding_idx=0)
    qemb = QuantEmbedding.from_embedding(emb)
    ids = torch.tensor([[1, 5, 49], [0, 0, 7]])
    table = quantize(emb.weight, QuantEmbedding.SPEC).dequantize()
    torch.testing.assert_close(qemb(ids), table[ids])
    assert qemb.qweight.dtype == torch.int8
    assert sqnr_db(emb(ids), qemb(ids)) > 35


def test_bad_settings_raise_slimformer_error():
    with pytest.raises(SlimformerError, match="2 to 8 bits"):
        QuantSpec(bits=9)
    with pytest.raises(SlimformerError, match="2 to 8 bits"):
        QuantSpec(bits=1)
    with pytest.raises(SlimformerError, match="does not divide"):
        quantize(torch.randn(4, 30), QuantSpec(bits=4, granularity=Granularity.PER_GROUP, group_size=16))
    with pytest.raises(SlimformerError, match="cannot be packed"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), 3)
