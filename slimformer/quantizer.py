"""A reference uniform quantizer: the formula, written once, that every other scheme is checked against.

Asymmetric b-bit (codes 0 .. 2^b - 1)::

    scale = (max - min) / (2^b - 1)
    q     = round((x - min) / scale)            # = round((x - min) / (max - min) * (2^b - 1))
    x'    = q * scale + min

Symmetric b-bit (codes -(2^(b-1) - 1) .. 2^(b-1) - 1, so zero is exact and the range is balanced)::

    scale = max|x| / (2^(b-1) - 1)
    q     = clamp(round(x / scale))
    x'    = q * scale

Statistics (min, max, max|x|) are taken per tensor, per channel (one slice along ``axis``) or per group
(``group_size`` consecutive values along the last dimension, e.g. input features of a Linear row).
Rounding error is at most half a step (``scale / 2``) for every value.

It also holds the modules that run such codes in PyTorch: :class:`QuantLinear` (weights stored as
integer codes, de-quantized on the fly: no special kernel, works on any CPU) and :class:`QuantEmbedding`
(int8 rows, only the looked-up rows are de-quantized), and a fake-quant with a straight-through
estimator for quantization-aware training.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from slimformer.errors import SlimformerError


class Granularity(StrEnum):
    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"
    PER_GROUP = "per-group"


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: bits, symmetric or not, and which values share a scale."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = Granularity.PER_CHANNEL
    group_size: int = 128
    axis: int = 0  # per-channel: the axis that indexes channels (rows = output features of a Linear)
    # Asymmetric only: widen the range to include 0 and round the offset to a whole number of steps (an
    # integer zero point), as int8 kernels quantize activations, so that 0 (padding) stays exact.
    integer_zero_point: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise SlimformerError(f"cannot quantize to {self.bits} bits; use 2 to 8 bits")
        if self.granularity == Granularity.PER_GROUP and self.group_size < 1:
            raise SlimformerError(f"group size {self.group_size} is not positive; use e.g. 32, 64 or 128")
        object.__setattr__(self, "granularity", Granularity(self.granularity))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def to_dict(self) -> dict:
        return {"bits": self.bits, "symmetric": self.symmetric, "granularity": str(self.granularity),
                "group_size": self.group_size, "axis": self.axis, "integer_zero_point": self.integer_zero_point}

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(bits=int(d["bits"]), symmetric=bool(d["symmetric"]), granularity=Granularity(d["granularity"]),
                   group_size=int(d.get("group_size", 128)), axis=int(d.get("axis", 0)),
                   integer_zero_point=bool(d.get("integer_zero_point", False)))


def _rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` as a 2-D matrix whose rows are the sets of values that share one scale."""
    if spec.granularity == Granularity.PER_TENSOR:
        return x.reshape(1, -1)
    if spec.granularity == Granularity.PER_CHANNEL:
        if not -x.dim() <= spec.axis < x.dim():
            raise SlimformerError(f"channel axis {spec.axis} does not exist in a {x.dim()}-d tensor; pick another axis")
        return x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if x.shape[-1] % spec.group_size:
        raise SlimformerError(f"group size {spec.group_size} does not divide the last dimension {x.shape[-1]}; "
                              "use a group size that divides it (e.g. 32)")
    return x.reshape(-1, spec.group_size)


def _unrows(rows: torch.Tensor, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity == Granularity.PER_CHANNEL:
        moved = list(shape)
        moved.insert(0, moved.pop(spec.axis))
        return rows.reshape(moved).movedim(0, spec.axis)
    return rows.reshape(shape)


@dataclass
class QTensor:
    """Integer codes plus what is needed to map them back: ``x' = q * scale + offset`` per row of codes."""

    q: torch.Tensor  # codes, in the original tensor's shape (int8 symmetric, uint8 asymmetric)
    scale: torch.Tensor  # one per scale-sharing row (see _rows), float32
    offset: torch.Tensor | None  # the row minimum (asymmetric), None for symmetric
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.offset, self.spec)


def quant_params(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, offset) per scale-sharing row of ``x``."""
    rows = _rows(x.detach().float(), spec)
    if spec.symmetric:
        scale = rows.abs().amax(dim=1) / spec.qmax
        # An all-zero row would divide by zero; any positive scale maps it to code 0 exactly.
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    lo, hi = rows.amin(dim=1), rows.amax(dim=1)
    if spec.integer_zero_point:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi - lo) / spec.qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.integer_zero_point:
        lo = -torch.round(-lo / scale) * scale  # offset = -zero_point * scale
    return scale, lo


def quantize(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Quantize ``x`` with the reference formula (see the module docstring)."""
    scale, offset = quant_params(x, spec)
    rows = _rows(x.detach().float(), spec)
    shifted = rows if offset is None else rows - offset[:, None]
    q = torch.round(shifted / scale[:, None])
    q = q.clamp(spec.qmin, spec.qmax).to(spec.code_dtype)
    return QTensor(_unrows(q, x.shape, spec), scale, offset, spec)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x' = q * scale + offset`` with the row layout of ``spec``."""
    rows = _rows(q, spec).to(dtype) * scale.to(dtype)[:, None]
    if offset is not None:
        rows = rows + offset.to(dtype)[:, None]
    return _unrows(rows, q.shape, spec)


def fake_quant(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then de-quantize in the forward pass; the gradient passes straight through (STE).

    Computed in float32 even under bf16 autocast: rounding in bf16 would add its own error on top."""
    xf = x.float()
    approx = quantize(xf, spec).dequantize()
    return (xf + (approx - xf).detach()).to(x.dtype)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2); inf when exact."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


# ---- bit packing: 2 and 4-bit codes share bytes, so the file really is 4x / 2x smaller than int8 -------


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) along the last dimension, 8 // bits per byte (bits 1, 2, 4 or 8)."""
    if bits == 8:
        return q.to(torch.uint8)
    if 8 % bits:
        raise SlimformerError(f"{bits}-bit codes cannot be packed into bytes; use 2, 4 or 8 bits")
    per = 8 // bits
    if q.shape[-1] % per:
        raise SlimformerError(f"last dimension {q.shape[-1]} is not a multiple of {per}; cannot pack {bits}-bit codes")
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = torch.zeros(q.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= q[..., i] << (i * bits)
    return out


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    if bits == 8:
        return packed
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def storage_bits(bits: int) -> int:
    """Bits a code occupies on disk: packed when the width divides a byte, else a whole byte."""
    return bits if 8 % bits == 0 else 8


# ---- modules --------------------------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as b-bit codes (packed) + scales (+ offsets), de-quantized on every
    forward pass. Reference kernel: portable and exact to the formula, smaller on disk and in memory,
    but not faster than fp32 (the de-quantization is extra work before an fp32 matmul)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec):
        super().__init__()
        if spec.granularity == Granularity.PER_CHANNEL and spec.axis != 0:
            raise SlimformerError("QuantLinear takes per-channel scales over output features (axis 0)")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        n_rows = {Granularity.PER_TENSOR: 1, Granularity.PER_CHANNEL: out_features,
                  Granularity.PER_GROUP: out_features * in_features // spec.group_size}[spec.granularity]
        packed_cols = in_features * storage_bits(spec.bits) // 8
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(n_rows))
        self.register_buffer("offset", None if spec.symmetric else torch.zeros(n_rows))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> QuantLinear:
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, spec)
        qt = quantize(linear.weight, spec)
        codes = qt.q.to(torch.int16) - spec.qmin  # symmetric codes shifted to unsigned for packing
        m.qweight = pack_codes(codes, storage_bits(spec.bits))
        m.scale = qt.scale
        m.offset = qt.offset
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
        return m

    def codes(self) -> torch.Tensor:
        c = unpack_codes(self.qweight, storage_bits(self.spec.bits)).to(torch.int16) + self.spec.qmin
        return c.to(self.spec.code_dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.offset, self.spec, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.bits}-bit " \
               f"{self.spec.granularity}{'' if self.spec.symmetric else ' asymmetric'}"


class QuantEmbedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row (symmetric). A lookup de-quantizes
    only the rows it reads, so the fp32 table never exists in memory."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 out_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = out_dtype
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    SPEC = QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL, axis=0)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> QuantEmbedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, emb.weight.dtype)
        qt = quantize(emb.weight, cls.SPEC)
        m.qweight, m.scale = qt.q, qt.scale
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.qweight[ids].to(torch.float32) * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)

    @property
    def weight(self) -> torch.Tensor:
        # Some library code asks the input embedding for its dtype/device; answer without keeping fp32 around.
        return dequantize(self.qweight, self.scale, None, self.SPEC, self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


# ---- GPT-2's Conv1D ---------------------------------------------------------------------------------------
# GPT-2 keeps its projections in ``transformers.pytorch_utils.Conv1D`` (``y = x @ W + b`` with W [in, out]),
# which no int8 kernel, torchao config or ONNX Runtime MatMul quantizer recognises (it exports as Gemm). The
# same map as an ``nn.Linear`` with the weight transposed is mathematically identical, so quantization and
# export swap Conv1D for Linear first.


def _is_conv1d(m: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(m, Conv1D)


def conv1d_names(model: nn.Module) -> list[str]:
    """Names of the Conv1D modules of ``model`` (empty for families without them)."""
    return [n for n, m in model.named_modules() if _is_conv1d(m)]


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``conv`` computes (weight transposed, bias shared)."""
    w = conv.weight
    lin = nn.Linear(conv.nx, conv.nf, bias=True, device=w.device, dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    lin.bias = conv.bias
    return lin


def swap_conv1d(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace Conv1D modules (all, or ``names``) by equivalent Linear layers in place; returns the names."""
    names = conv1d_names(model) if names is None else names
    for n in names:
        model.set_submodule(n, linear_from_conv1d(model.get_submodule(n)))
    return names


@contextlib.contextmanager
def conv1d_as_linear(model: nn.Module):
    """Within the block the model's Conv1D modules are Linear layers; afterwards the Conv1D modules are back,
    holding whatever the Linear weights became (so training inside the block is kept)."""
    originals = {n: model.get_submodule(n) for n in conv1d_names(model)}
    swap_conv1d(model, list(originals))
    try:
        yield list(originals)
    finally:
        for n, conv in originals.items():
            lin = model.get_submodule(n)
            with torch.no_grad():
                conv.weight.copy_(lin.weight.detach().t())
            model.set_submodule(n, conv)


__all__ = ["Granularity", "QTensor", "QuantEmbedding", "QuantLinear", "QuantSpec", "conv1d_as_linear", "conv1d_names",
           "dequantize", "fake_quant", "linear_from_conv1d", "pack_codes", "quant_params", "quantize", "sqnr_db",
           "storage_bits", "swap_conv1d", "unpack_codes"]
