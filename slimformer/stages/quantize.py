"""Quantization: PyTorch and ONNX Runtime schemes, post-training or quantization-aware.

PyTorch schemes change the model in place and save integer codes + scales to safetensors (so the file
really shrinks); loading replays the recorded scheme (:func:`replay_quantization`) on the float
architecture and puts the saved codes back, bit for bit:

* ``torch-dynamic-int8``: every Linear via ``torch.ao.quantization.quantize_dynamic`` (int8 weights per
  output channel, activations quantized per batch at run time; fbgemm kernels).
* ``torch-int8-weight-only``: torchao ``Int8WeightOnlyConfig`` (int8 weights per output channel, fp32 math).
* ``torch-int4-weight-only``: 4-bit asymmetric group-wise weights, packed two per byte. torchao's int4
  kernels need CUDA or the mslk package, so on CPU this runs on the reference quantizer with
  de-quantization on the fly (the record says which, and why).
* ``torch-int8-embeddings``: only the input embedding table, int8 per row (half of MiniLM's weights).
* ``bf16``: all weights in bfloat16 (fast only where the CPU has AMX / AVX512-BF16).

Integer schemes also store the input embedding table as int8 unless ``embeddings=keep``.

ONNX Runtime schemes export the model (``slimformer.export``) and quantize the graph:
``ort-dynamic-int8`` (``quantize_dynamic``, per-channel int8 weights, uint8 activations quantized per
batch) and ``ort-static-int8`` (``quantize_static``, QDQ, activation ranges calibrated on training
examples with MinMax, Percentile or Entropy). Both quantize the weight MatMuls and the embedding Gathers.

``qat-int8`` fine-tunes with fake-quant (straight-through estimator) that mimics the target's int8
arithmetic, then converts to the real target scheme (``ort-dynamic-int8`` or ``torch-dynamic-int8``).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.quantizer import (
    Granularity,
    QuantEmbedding,
    QuantLinear,
    QuantSpec,
    conv1d_as_linear,
    fake_quant,
    swap_conv1d,
)
from slimformer.stages.finetune import TrainConfig
from slimformer.tasks import TaskData, TaskType, encode


class Scheme(StrEnum):
    TORCH_DYNAMIC_INT8 = "torch-dynamic-int8"
    TORCH_INT8_WEIGHT_ONLY = "torch-int8-weight-only"
    TORCH_INT4_WEIGHT_ONLY = "torch-int4-weight-only"
    TORCH_INT8_EMBEDDINGS = "torch-int8-embeddings"
    BF16 = "bf16"
    ORT_DYNAMIC_INT8 = "ort-dynamic-int8"
    ORT_STATIC_INT8 = "ort-static-int8"
    QAT_INT8 = "qat-int8"


TORCH_SCHEMES = {Scheme.TORCH_DYNAMIC_INT8, Scheme.TORCH_INT8_WEIGHT_ONLY, Scheme.TORCH_INT4_WEIGHT_ONLY,
                 Scheme.TORCH_INT8_EMBEDDINGS, Scheme.BF16}
ORT_SCHEMES = {Scheme.ORT_DYNAMIC_INT8, Scheme.ORT_STATIC_INT8}


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


class EmbeddingPrecision(StrEnum):
    AUTO = "auto"  # int8 with the integer schemes, unchanged with bf16
    INT8 = "int8"
    INT4 = "int4"  # ort-* only: the token table in 4-bit blocks (GatherBlockQuantized), other tables int8
    KEEP = "keep"


class OutlierPolicy(StrEnum):
    DYNAMIC = "dynamic"  # int8 weights, activation range taken per batch at run time
    STATIC = "static"  # calibrated like every other layer
    FLOAT = "float"  # left in fp32


class QatTarget(StrEnum):
    ORT_DYNAMIC_INT8 = "ort-dynamic-int8"
    TORCH_DYNAMIC_INT8 = "torch-dynamic-int8"


def _qat_train_default() -> TrainConfig:
    # A short, gentle pass: QAT adapts a trained model to rounding noise, it does not re-learn the task.
    return TrainConfig(epochs=1.0, learning_rate=2e-5, warmup_ratio=0.0, evals_per_epoch=2)


class QuantizeConfig(BaseModel):
    """Quantize a model with one scheme."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["quantize"] = "quantize"
    scheme: Scheme = Field(description="quantization scheme: " + ", ".join(s.value for s in Scheme))
    embeddings: EmbeddingPrecision = Field(EmbeddingPrecision.AUTO,
                                           description="input embedding table: auto (int8 with integer schemes), "
                                                       "int8, int4 (ort-* schemes: the token table in 4-bit "
                                                       "blocks of 64) or keep")
    group_size: int = Field(32, ge=8, le=1024, description="torch-int4-weight-only: input features sharing one "
                                                           "scale and offset (must divide the layer width)")
    per_channel: bool = Field(True, description="ort-*: one weight scale per output channel (else per tensor)")
    calibration: CalibrationMethod = Field(CalibrationMethod.PERCENTILE,
                                           description="ort-static-int8: how activation ranges are chosen")
    calibration_examples: int = Field(256, ge=1, le=100_000,
                                      description="ort-static-int8: training examples run for calibration")
    percentile: float = Field(99.999, ge=90, le=100, description="calibration percentile: range covers this "
                                                                 "share of activation magnitudes")
    outlier_layers: OutlierPolicy = Field(
        OutlierPolicy.DYNAMIC, description="ort-static-int8: FFN down-projections, whose GELU inputs have long "
                                           "tails that one calibrated range serves badly: dynamic, static or float")
    opset: int | None = Field(None, ge=14, le=23, description="ort-*: ONNX opset of the exported graph (default: "
                               "23, or 18 for rotary-embedding models)")
    max_length: int = Field(128, ge=8, le=8192, description="truncate calibration, training and eval inputs")
    qat_target: QatTarget = Field(QatTarget.ORT_DYNAMIC_INT8,
                                  description="qat-int8: the real int8 scheme the trained model is converted to")
    qat: TrainConfig = Field(default_factory=_qat_train_default,
                             description="qat-int8: training-loop settings of the fake-quant fine-tuning")
    qat_teacher_weight: float = Field(1.0, ge=0, le=1, description="qat-int8: weight of matching the float "
                                                                   "model's outputs (distillation); the rest: labels")
    qat_temperature: float = Field(2.0, gt=0, le=100, description="qat-int8: softmax temperature of the float "
                                                                  "model's soft targets")
    seed: int = Field(0, ge=0, description="random seed (calibration sample, QAT data order)")

    @property
    def needs_data(self) -> bool:
        return self.scheme in (Scheme.ORT_STATIC_INT8, Scheme.QAT_INT8)

    @property
    def target(self) -> Scheme:
        """The scheme that produces the saved model (QAT ends in its target scheme)."""
        return Scheme(self.qat_target.value) if self.scheme == Scheme.QAT_INT8 else self.scheme

    @model_validator(mode="after")
    def _int4_embeddings_need_ort(self) -> QuantizeConfig:
        if self.embeddings == EmbeddingPrecision.INT4 and self.target not in ORT_SCHEMES:
            raise ValueError(f"embeddings int4 needs an ort-* scheme (ONNX Runtime's GatherBlockQuantized); "
                             f"use embeddings int8 with {self.target.value}")
        return self

    def int8_embeddings(self) -> bool:
        """Quantize the embedding tables (int8; with ``int4`` the token table then goes to 4 bits)."""
        if self.embeddings == EmbeddingPrecision.AUTO:
            return self.target not in (Scheme.BF16,)
        return self.embeddings in (EmbeddingPrecision.INT8, EmbeddingPrecision.INT4)


# ---- PyTorch schemes ---------------------------------------------------------------------------------

INT8_CHANNEL = QuantSpec(bits=8, symmetric=True, granularity=Granularity.PER_CHANNEL)


def _quiet_torchao():
    """Import torchao without its start-up warnings about optional CUDA libraries missing on CPU."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao  # noqa: F401


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def _input_embedding_name(model: nn.Module) -> tuple[str | None, str | None]:
    """(module name of the input embedding table, reason it is left alone or None)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if get else None
    if not isinstance(emb, nn.Embedding):
        return None, "the model has no plain input embedding table"
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is emb.weight:
        return None, "the input embedding is tied to the output layer (quantizing it would change the LM head)"
    for name, m in model.named_modules():
        if m is emb:
            return name, None
    return None, "the input embedding is not a submodule"


def _tied_output_name(model: nn.Module) -> str | None:
    """Module name of the output layer (LM head) when it shares its weight with the input embedding."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb, out = (get_in() if get_in else None), (get_out() if get_out else None)
    if emb is None or out is None or getattr(out, "weight", None) is not getattr(emb, "weight", None):
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def _probe_torchao_int4() -> str | None:
    """None if torchao's int4 weight-only kernel runs here, else the reason it does not."""
    try:
        _quiet_torchao()
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        probe = nn.Sequential(nn.Linear(64, 64))
        quantize_(probe, Int4WeightOnlyConfig(group_size=32))
        probe(torch.randn(2, 64))
        return None
    except Exception as e:  # any failure means: not usable on this machine
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _dynamic_int8(model: nn.Module, names: list[str]) -> None:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices: the kernels are current
        quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)


def _int8_weight_only(model: nn.Module, names: list[str]) -> None:
    _quiet_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    wanted = set(names)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in wanted)


def quantize_torch(slim: models.SlimModel, config: QuantizeConfig) -> dict[str, Any]:
    """Apply a PyTorch scheme to ``slim.model`` in place; set the saver and the record entry. Returns it."""
    scheme = config.target
    if scheme not in TORCH_SCHEMES:
        raise SlimformerError(f"scheme {scheme} is not a PyTorch scheme; use quantize_job for ort-* schemes")
    model = slim.model.eval()
    info: dict[str, Any] = {"scheme": scheme.value, "backend": "pytorch", "notes": []}

    if scheme == Scheme.BF16:
        model.to(torch.bfloat16)
        info.update(weights="bfloat16", kernel="native bf16 matmuls (fast with AMX or AVX512-BF16)")
        from slimformer.measure import supports_fast_bf16

        if not supports_fast_bf16():
            info["notes"].append("this CPU has no native bf16 matrix instructions: expect bf16 to be slow here")

    if scheme in (Scheme.TORCH_DYNAMIC_INT8, Scheme.TORCH_INT8_WEIGHT_ONLY, Scheme.TORCH_INT4_WEIGHT_ONLY):
        swapped = swap_conv1d(model)  # GPT-2: no int8 kernel takes Conv1D; the equivalent Linear is exact
        if swapped:
            info["conv1d_as_linear"] = swapped
            info["notes"].append(f"{len(swapped)} Conv1D layers (GPT-2) turned into the equivalent Linear layers")

    emb_info = None
    if config.int8_embeddings():
        name, reason = _input_embedding_name(model)
        if name is None:
            info["notes"].append(f"embeddings kept: {reason}")
        else:
            old = model.get_submodule(name)
            model.set_submodule(name, QuantEmbedding.from_embedding(old))
            emb_info = {"format": "reference-int8", "spec": QuantEmbedding.SPEC.to_dict(), "modules": [name],
                        "out_dtype": str(old.weight.dtype).replace("torch.", "")}
    info["embeddings"] = emb_info

    names = _linear_names(model)
    tied = _tied_output_name(model)
    if tied in names:
        # A quantized copy of a tied LM head would un-tie it: the float table stays for the input side, so the
        # model would grow. The head keeps sharing the (float) embedding table.
        names.remove(tied)
        info["notes"].append(f"{tied} kept in float: it shares its weight with the input embedding")
    linear: dict[str, Any] | None = None
    if scheme == Scheme.TORCH_DYNAMIC_INT8:
        _dynamic_int8(model, names)
        linear = {"format": "torch-dynamic", "spec": INT8_CHANNEL.to_dict(), "modules": names}
        info.update(weights="int8", kernel="torch.ao dynamic quantized Linear (fbgemm), activations quantized "
                                           "per batch at run time")
    elif scheme == Scheme.TORCH_INT8_WEIGHT_ONLY:
        try:
            _int8_weight_only(model, names)
            linear = {"format": "torchao-int8", "spec": INT8_CHANNEL.to_dict(), "modules": names}
            info.update(weights="int8", kernel="torchao Int8WeightOnlyConfig (fp32 activations)")
        except Exception as e:  # torchao not usable here: the reference codes are the same int8 per channel
            _reference_linears(model, names, INT8_CHANNEL)
            linear = {"format": "reference", "spec": INT8_CHANNEL.to_dict(), "modules": names}
            info.update(weights="int8", kernel="reference de-quantize on the fly")
            info["notes"].append(f"torchao Int8WeightOnlyConfig failed ({type(e).__name__}); reference kernel used")
    elif scheme == Scheme.TORCH_INT4_WEIGHT_ONLY:
        spec = QuantSpec(bits=4, symmetric=False, granularity=Granularity.PER_GROUP, group_size=config.group_size)
        fits = [n for n in names if model.get_submodule(n).in_features % config.group_size == 0]
        skipped = {n: f"in_features not a multiple of group size {config.group_size}" for n in names if n not in fits}
        _reference_linears(model, fits, spec)
        linear = {"format": "reference", "spec": spec.to_dict(), "modules": fits, "skipped": skipped}
        reason = _probe_torchao_int4()
        info.update(weights="int4", kernel="reference: 4-bit codes packed two per byte, de-quantized on the fly "
                                           "before an fp32 matmul (smaller, not faster)")
        info["notes"].append("torchao Int4WeightOnlyConfig " + (f"does not run on this CPU ({reason})" if reason else
                             "runs here but its packed layout is kernel-specific; portable reference codes used"))
    info["linear"] = linear
    if linear is None and emb_info is None and scheme != Scheme.BF16:
        raise SlimformerError("the model has nothing this scheme can quantize; pick another scheme")
    info["settings"] = config.model_dump(mode="json")
    slim.record["quantization"] = info
    _attach_saver(model)
    return info


def _reference_linears(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    for n in names:
        model.set_submodule(n, QuantLinear.from_linear(model.get_submodule(n), spec))


def _attach_saver(model: nn.Module) -> None:
    # models.save calls model.slimformer_save(folder) instead of save_pretrained when it exists, and
    # models.count_parameters calls slimformer_count_parameters (quantized weights are not parameters).
    model.slimformer_save = lambda folder: save_quantized(model, Path(folder))
    model.slimformer_count_parameters = lambda: count_quantized_parameters(model)


def count_quantized_parameters(model: nn.Module) -> dict[str, int]:
    """Total and non-zero weights of a quantized model: integer codes count like the floats they replace."""
    total = nonzero = 0
    seen: set[int] = set()

    def add(t: torch.Tensor) -> None:
        nonlocal total, nonzero
        total += t.numel()
        nonzero += int(torch.count_nonzero(t).item())

    for m in model.modules():
        if isinstance(m, QuantLinear):
            add(m.dequantized_weight())
        elif isinstance(m, QuantEmbedding):
            add(m.qweight)
        elif _is_dynamic_linear(m):
            w, b = m._weight_bias()
            add(w.int_repr() - w.q_per_channel_zero_points().to(torch.int8)[:, None])
            if b is not None:
                add(b.detach())
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            add(p.qdata if _is_torchao_int8(p) else p.detach())
    return {"parameters": total, "nonzero_parameters": nonzero}


def _is_dynamic_linear(m: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(m, DynamicLinear)


def _is_torchao_int8(p: Any) -> bool:
    return type(p).__name__ == "Int8Tensor" and hasattr(p, "qdata")


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor needed to rebuild the model, with quantized weights as integer codes + scales.

    Keys of quantized Linear layers: ``<name>.qweight`` (int8/uint8), ``<name>.scale``, maybe
    ``<name>.zero_point``, ``<name>.bias``. Tensors shared by tying are written once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, torch.dtype, tuple[int, ...]]] = set()
    storages: set[int] = set()
    done: list[str] = []  # modules written as a whole: skip their children

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), t.dtype, tuple(t.shape))
        if ident in seen:  # the same tensor again (tied weights): the loader re-ties it
            return
        seen.add(ident)
        # safetensors refuses tensors that share memory; a view of an already written storage is copied.
        out[key] = t.contiguous().clone() if ptr in storages else t.contiguous()
        storages.add(ptr)

    for name, m in model.named_modules():
        if any(name.startswith(d + ".") for d in done):
            continue
        prefix = f"{name}." if name else ""
        if _is_dynamic_linear(m):
            w, b = m._weight_bias()
            put(prefix + "qweight", w.int_repr())
            put(prefix + "scale", w.q_per_channel_scales())
            put(prefix + "zero_point", w.q_per_channel_zero_points().to(torch.int32))
            if b is not None:
                put(prefix + "bias", b)
            done.append(name)
            continue
        if isinstance(m, nn.Linear) and _is_torchao_int8(m.weight):
            put(prefix + "qweight", m.weight.qdata)
            put(prefix + "scale", m.weight.scale.reshape(-1))
            if m.bias is not None:
                put(prefix + "bias", m.bias)
            done.append(name)
            continue
        for pname, p in m._parameters.items():
            if p is not None:
                put(prefix + pname, p)
        for bname, b in m._buffers.items():
            if b is not None and bname not in m._non_persistent_buffers_set:
                put(prefix + bname, b)
    return out


def save_quantized(model: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    save_file(quantized_state_dict(model), str(folder / "model.safetensors"),
              metadata={"format": "pt", "slimformer": "quantized"})


def replay_quantization(model: nn.Module, record: dict[str, Any], folder: Path) -> nn.Module:
    """Rebuild a saved quantized model: ``model`` is the float architecture (surgery already replayed);
    the recorded scheme's modules are put in place and the saved codes, scales and float weights loaded."""
    from safetensors.torch import load_file

    if record.get("backend") == "onnxruntime":
        raise SlimformerError(f"{folder} holds an ONNX Runtime model; load it with slimformer.export.OrtRunner")
    try:
        scheme = Scheme(record["scheme"])
    except (KeyError, ValueError):
        raise SlimformerError(f"{folder}/slimformer.json names an unknown quantization scheme "
                              f"{record.get('scheme')!r}; upgrade slimformer or re-quantize") from None
    state = load_file(str(Path(folder) / "model.safetensors"))
    if scheme == Scheme.BF16:
        model.to(torch.bfloat16)
    if record.get("conv1d_as_linear"):
        swap_conv1d(model, record["conv1d_as_linear"])
    emb = record.get("embeddings")
    if emb:
        out_dtype = getattr(torch, emb.get("out_dtype", "float32"))
        for name in emb["modules"]:
            old = model.get_submodule(name)
            model.set_submodule(name, QuantEmbedding(old.num_embeddings, old.embedding_dim, old.padding_idx, out_dtype))
    lin = record.get("linear")
    fmt, spec = (lin["format"], QuantSpec.from_dict(lin["spec"])) if lin else (None, None)
    popped: dict[str, tuple[torch.Tensor, ...]] = {}
    for name in lin["modules"] if lin else []:
        old = model.get_submodule(name)
        if fmt == "reference":  # plain buffers: the state-dict load below fills them
            model.set_submodule(name, QuantLinear(old.in_features, old.out_features, old.bias is not None, spec))
        elif fmt in ("torch-dynamic", "torchao-int8"):
            popped[name] = (state.pop(f"{name}.qweight"), state.pop(f"{name}.scale"),
                            state.pop(f"{name}.zero_point", None), state.pop(f"{name}.bias", None))
        else:
            raise SlimformerError(f"unknown quantized layer format {fmt!r} in {folder}; upgrade slimformer")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied and "position_ids" not in k
               and not any(k.startswith(h + ".") for h in popped)]
    if missing or unexpected:
        raise SlimformerError(f"weights in {folder} do not fit the recorded quantization (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}); re-quantize the float model")
    if getattr(model.config, "tie_word_embeddings", False) and not emb:
        model.tie_weights()
    # Kernel modules go in last: they take their codes directly, not through load_state_dict.
    for name, (qweight, scale, zero, bias) in popped.items():
        old = model.get_submodule(name)
        if fmt == "torch-dynamic":
            model.set_submodule(name, _dynamic_linear_from_codes(old, qweight, scale, zero, bias))
        else:
            _quiet_torchao()
            from torchao.quantization import Int8Tensor

            w = Int8Tensor(qweight, scale.reshape(-1, 1), [1, old.in_features], old.weight.dtype)
            old.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                old.bias = nn.Parameter(bias, requires_grad=False)
    model.eval()
    _attach_saver(model)
    return model


def _dynamic_linear_from_codes(old: nn.Linear, qweight: torch.Tensor, scale: torch.Tensor,
                               zero: torch.Tensor | None, bias: torch.Tensor | None) -> nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        new = DynamicLinear(old.in_features, old.out_features, bias_=bias is not None, dtype=torch.qint8)
        zero = torch.zeros(len(scale), dtype=torch.long) if zero is None else zero.long()
        w = torch._make_per_channel_quantized_tensor(qweight, scale.double(), zero, 0)
        new.set_weight_bias(w, bias)
    return new


# ---- ONNX Runtime schemes ------------------------------------------------------------------------------


def _weight_nodes(model_proto, embeddings: bool) -> tuple[list[str], dict[str, int]]:
    """Names of the nodes to quantize: MatMuls with a weight matrix as second input, and the Gathers that
    read a float embedding table. MatMuls of two activations (attention scores) stay fp32; Gemms are
    rewritten as MatMuls first (:func:`gemms_as_matmuls`)."""
    inits = {t.name: t for t in model_proto.graph.initializer}
    nodes, counts = [], {"MatMul": 0, "Gather": 0}
    for n in model_proto.graph.node:
        weight_matmul = n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits
        table = inits.get(n.input[0]) if n.op_type == "Gather" else None
        float_table = table is not None and len(table.dims) == 2 and table.data_type == 1  # 1 = FLOAT
        if weight_matmul or (embeddings and float_table):
            nodes.append(n.name)
            counts[n.op_type] += 1
    if any(not name for name in nodes):
        raise SlimformerError("the exported graph has unnamed nodes; re-export with a newer torch")
    return nodes, counts


# Blocks of 4-bit token-table codes that share one fp32 scale: the largest of these that divides the hidden
# size. 64 halves the scales of 32 (0.28 MB for an 11,630-token MiniLM table); on SST-2 tuning it scored the
# same as 32 and 128 within noise (0.894, 0.888, 0.882 for a 3-layer student).
INT4_EMBEDDING_BLOCKS = (64, 32, 16)


def int4_embedding_block(hidden: int) -> int:
    """The block size for a token table of width ``hidden`` (see :data:`INT4_EMBEDDING_BLOCKS`)."""
    for block in INT4_EMBEDDING_BLOCKS:
        if hidden % block == 0:
            return block
    raise SlimformerError(f"embeddings int4 needs a hidden size divisible by {INT4_EMBEDDING_BLOCKS[-1]} "
                          f"(got {hidden}); use embeddings int8")


def gemms_as_matmuls(model_proto) -> int:
    """Rewrite each ``Gemm`` with a constant weight (a BERT pooler or classifier on 2-d input) as ``MatMul``
    (+ ``Add`` for the bias), in place, so that ORT's quantizers, which pass Gemm by, quantize its weight
    too: MiniLM's fp32 pooler alone is 0.59 MB. Only plain Gemms (alpha = beta = 1, A not transposed) are
    rewritten, and not the one that writes a graph output (a classifier head, num_labels x hidden: in int8 it
    would save almost nothing and round the logits). Returns how many were rewritten."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    nodes, done = [], 0
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = (n.op_type == "Gemm" and len(n.input) > 1 and n.input[1] in inits and attrs.get("transA", 0) == 0
                 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and n.output[0] not in outputs)
        if not plain:
            nodes.append(n)
            continue
        weight = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            weight = np.ascontiguousarray(weight.T)
        w_name = f"{n.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(weight, w_name))
        has_bias = len(n.input) > 2 and bool(n.input[2])
        product = f"{n.output[0]}_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [product], name=f"{n.name}_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=f"{n.name}_bias"))
        done += 1
    if done:
        used = {i for n in nodes for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.node[:]
        graph.node.extend(nodes)
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return done


def _token_gather(model_proto, nodes: list[str]) -> tuple[str, int] | None:
    """The Gather reading the token embedding table (the largest table among the Gathers to quantize) and
    the 4-bit block size for it."""
    inits = {t.name: t for t in model_proto.graph.initializer}
    tables = {n.name: inits[n.input[0]] for n in model_proto.graph.node
              if n.op_type == "Gather" and n.name in nodes and n.input[0] in inits}
    if not tables:
        return None
    name = max(tables, key=lambda k: tables[k].dims[0] * tables[k].dims[1])
    return name, int4_embedding_block(tables[name].dims[1])


def _int4_gather(path: Path, node: str, block: int) -> None:
    """Rewrite one Gather of the graph at ``path`` as ORT's GatherBlockQuantized: its table in 4-bit blocks
    along the hidden axis, each block with a float scale and a 4-bit zero point (asymmetric)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = onnx.load(str(path))
    others = [n.name for n in model.graph.node if n.name != node]
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=4,
                                       op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=cfg)
    quantizer.process()
    if not any(n.op_type == "GatherBlockQuantized" for n in quantizer.model.model.graph.node):
        raise SlimformerError(f"ONNX Runtime did not quantize the embedding Gather {node}; use embeddings int8")
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


def _node_modules(model_proto, wrapper_prefix: str = "model.") -> dict[str, str]:
    """ONNX node name -> the PyTorch module it came from (the torch.export exporter records name scopes)."""
    import ast

    out = {}
    for n in model_proto.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                scopes = ast.literal_eval(p.value)
                if len(scopes) >= 2:
                    out[n.name] = scopes[-2].removeprefix(wrapper_prefix)
    return out


def _ffn_out_modules(model: nn.Module) -> set[str]:
    """Module names of the FFN down-projections (their input, the GELU output, has the widest tails)."""
    from slimformer.arch import adapter_for

    try:
        adapter = adapter_for(model)
    except SlimformerError:
        return set()
    base = adapter.base(model)
    base_name = next((n for n, m in model.named_modules() if m is base), "")
    prefix = f"{base_name}.{adapter.layers}" if base_name else adapter.layers
    return {f"{prefix}.{i}.{adapter.ffn_out}" for i in range(len(adapter.get_layers(model)))}


def _calibration_reader(base: type, features: list[dict[str, Any]], input_names: list[str]):
    """Feeds the calibration examples one at a time (unpadded: padding would distort the ranges)."""
    import numpy as np

    items = [{k: np.asarray([f[k]], dtype=np.int64) for k in input_names if k in f} for f in features]

    class Reader(base):  # type: ignore[misc, valid-type]
        # ORT's histogram calibrators stack all outputs of one collection pass into one array, which fails
        # for inputs of different lengths; with CalibStridedMinMax=1 every example is its own pass (the
        # histograms are merged across passes).
        def __init__(self) -> None:
            self.set_range(0, len(items))

        def __len__(self) -> int:
            return len(items)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(items[start_index:end_index])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    return Reader()


def _calibration_features(task: TaskData, tokenizer, config: QuantizeConfig) -> list[dict[str, Any]]:
    examples = list(task.train)
    if task.type == TaskType.CAUSAL_LM:  # one long text: its blocks are the examples
        feats = encode(task, examples, tokenizer, max_length=config.max_length)
        random.Random(config.seed).shuffle(feats)
        return feats[: config.calibration_examples]
    random.Random(config.seed).shuffle(examples)
    return encode(task, examples[: config.calibration_examples], tokenizer, max_length=config.max_length)


def quantize_onnx(slim: models.SlimModel, task: TaskData | None, config: QuantizeConfig, folder: Path,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``slim`` to ONNX, quantize the graph with an ort-* scheme into ``folder``, compare with PyTorch."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization import CalibrationMethod as OrtCalibration

    from slimformer.export import (
        _check_batches,
        _LogitsOnly,
        check_onnx,
        export_onnx,
        model_input_names,
        quiet,
        strip_debug_info,
    )

    scheme = config.target
    static = scheme == Scheme.ORT_STATIC_INT8
    if static and (task is None or not task.train):
        raise SlimformerError("ort-static-int8 needs calibration data; pass --data with a train split")
    folder.mkdir(parents=True, exist_ok=True)
    embeddings = config.int8_embeddings()
    info: dict[str, Any] = {"scheme": scheme.value, "backend": "onnxruntime", "weights": "int8", "notes": []}
    names = model_input_names(slim.model, slim.tokenizer)
    with tempfile.TemporaryDirectory(prefix="slimformer-onnx-") as tmp:
        facts = export_onnx(slim, tmp, opset=config.opset, write_extras=False)
        src, pre, mid = Path(tmp) / "model.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "static.onnx"
        node_module = _node_modules(onnx.load(str(src), load_external_data=False))
        try:  # shape inference + graph clean-up: what ORT's quantization tools expect as input
            # Symbolic shape inference does not finish on torch.export graphs; ONNX shape inference does.
            with quiet():
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            pre = src
            info["notes"].append(f"pre-processing skipped ({type(e).__name__})")
        graph = onnx.load(str(pre))
        if gemms_as_matmuls(graph):
            pre = Path(tmp) / "matmul.onnx"
            onnx.save(graph, str(pre))
        nodes, counts = _weight_nodes(graph, embeddings)
        token_gather = _token_gather(graph, nodes) if config.embeddings == EmbeddingPrecision.INT4 \
            else None
        if token_gather:
            nodes = [n for n in nodes if n != token_gather[0]]  # 4-bit below, not int8
        if not counts["MatMul"]:
            raise SlimformerError("the exported graph has no weight MatMul to quantize; pick a PyTorch scheme")
        out = folder / "model.onnx"
        t0 = time.time()
        dynamic_nodes, static_nodes = nodes, []
        if static:
            outliers = _ffn_out_modules(slim.model) if config.outlier_layers != OutlierPolicy.STATIC else set()
            if config.outlier_layers != OutlierPolicy.STATIC and not outliers:
                info["notes"].append("FFN layers unknown for this family: every MatMul calibrated statically")
            flagged = [n for n in nodes if node_module.get(n) in outliers]
            static_nodes = [n for n in nodes if n not in flagged]
            dynamic_nodes = flagged if config.outlier_layers == OutlierPolicy.DYNAMIC else []
            info["outlier_layers"] = {"policy": config.outlier_layers.value,
                                      "modules": sorted(node_module[n] for n in flagged)}
        with quiet():
            if static:
                feats = _calibration_features(task, slim.tokenizer, config)  # type: ignore[arg-type]
                reader = _calibration_reader(CalibrationDataReader, feats, names)
                method = {CalibrationMethod.MINMAX: OrtCalibration.MinMax,
                          CalibrationMethod.PERCENTILE: OrtCalibration.Percentile,
                          CalibrationMethod.ENTROPY: OrtCalibration.Entropy}[config.calibration]
                quantize_static(str(pre), str(mid if dynamic_nodes else out), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=["MatMul", "Gather"], nodes_to_quantize=static_nodes,
                                per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=method,
                                extra_options={"MatMulConstBOnly": True, "CalibPercentile": config.percentile,
                                               "CalibStridedMinMax": 1})
                info["activations"] = "uint8 per tensor, ranges fixed by calibration"
                info["calibration"] = {"method": config.calibration.value, "examples": len(feats),
                                       "percentile": config.percentile
                                       if config.calibration == CalibrationMethod.PERCENTILE else None,
                                       "source": f"train split (shuffled, seed {config.seed})"}
                pre = mid
            if dynamic_nodes:
                quantize_dynamic(str(pre), str(out), op_types_to_quantize=["MatMul", "Gather"],
                                 nodes_to_quantize=dynamic_nodes, per_channel=config.per_channel,
                                 weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
                if not static:
                    info["activations"] = "uint8 per tensor, range taken per batch at run time"
            if token_gather:
                _int4_gather(out, *token_gather)
        strip_debug_info(out)
        info["quantize_seconds"] = time.time() - t0
    info["quantized_nodes"] = {**counts, "static": len(static_nodes), "dynamic": len(dynamic_nodes)}
    info["embeddings"] = "int8 (Gather)" if embeddings and counts["Gather"] else "float32"
    if token_gather:
        info["embeddings"] = (f"token table uint4, blocks of {token_gather[1]} with a scale and zero point "
                              f"each (GatherBlockQuantized); other tables int8")
    info["per_channel"] = config.per_channel
    batches = _check_batches(slim.tokenizer, names)
    info["max_abs_diff_vs_float"] = check_onnx(_LogitsOnly(slim.model.eval(), names), out, batches)
    info["settings"] = config.model_dump(mode="json")
    info["kernel"] = "ONNX Runtime CPU: " + ("QDQ MatMuls fused to integer kernels" if static else
                                            "MatMulInteger with DynamicQuantizeLinear")
    if static and dynamic_nodes:
        info["kernel"] += "; outlier layers MatMulInteger with per-batch ranges"
    info.update(extra or {})
    from slimformer.export import write_onnx_folder

    write_onnx_folder(slim, folder, {"export": facts}, quantization=info)
    return info


# ---- quantization-aware training -------------------------------------------------------------------------

# What the dynamic int8 kernels do to a Linear's input: one range per tensor, taken per batch, widened to
# include 0, with an integer zero point. ORT uses 8 bits; PyTorch's fbgemm kernels use 7 (reduce_range,
# which avoids int16 overflow on CPUs without VNNI).
ACT_SPECS = {QatTarget.ORT_DYNAMIC_INT8: QuantSpec(bits=8, symmetric=False, granularity=Granularity.PER_TENSOR,
                                                   integer_zero_point=True),
             QatTarget.TORCH_DYNAMIC_INT8: QuantSpec(bits=7, symmetric=False, granularity=Granularity.PER_TENSOR,
                                                     integer_zero_point=True)}


class _FakeQuantLinear(nn.Linear):
    """nn.Linear that sees int8 rounding in training: weights per output channel (symmetric), inputs per
    tensor (asymmetric, range of the current batch), as the target's dynamic int8 kernels compute them.
    Every Linear is rounded, the classifier head too, which ONNX Runtime schemes keep in float when it
    exports as a Gemm (:func:`gemms_as_matmuls`): a little more noise in training than at run time.

    Swapped in by changing ``__class__`` so parameter names, checkpoints and optimizer state stay those
    of the plain model."""

    act_spec = ACT_SPECS[QatTarget.ORT_DYNAMIC_INT8]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant(x, self.act_spec), fake_quant(self.weight, INT8_CHANNEL), self.bias)


def _set_fake_quant(model: nn.Module, on: bool, target: QatTarget = QatTarget.ORT_DYNAMIC_INT8) -> int:
    n = 0
    cls = type("FakeQuantLinear", (_FakeQuantLinear,), {"act_spec": ACT_SPECS[target]})
    for m in model.modules():
        if on and type(m) is nn.Linear:
            m.__class__ = cls
            n += 1
        elif not on and isinstance(m, _FakeQuantLinear):
            m.__class__ = nn.Linear
            n += 1
    return n


def quantization_aware_training(slim: models.SlimModel, task: TaskData, config: QuantizeConfig,
                                work_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``slim`` with fake-quant Linear layers, then remove them (the weights stay float; the target
    scheme quantizes them for real). With ``qat_teacher_weight`` > 0 the float model is the teacher: the
    quantized model learns to give the float model's outputs, which is what accuracy recovery means, rather
    than drifting to a different model that happens to fit the labels (the distillation stage's loop)."""
    import copy

    from slimformer.stages.finetune import train

    teacher = copy.deepcopy(slim.model).eval() if config.qat_teacher_weight > 0 else None
    # GPT-2's Conv1D layers train as the equivalent Linear layers, so they see the fake quantization too.
    with conv1d_as_linear(slim.model):
        n = _set_fake_quant(slim.model, True, config.qat_target)
        try:
            if teacher is not None:
                from slimformer.stages.distill import DistillConfig, distill_train

                kd = DistillConfig(**config.qat.model_dump(), alpha=1 - config.qat_teacher_weight,
                                   temperature=config.qat_temperature)
                summary = distill_train(slim, teacher, task, kd, work_dir, progress=progress)
            else:
                summary = train(slim, task, config.qat, work_dir, progress=progress)
        finally:
            _set_fake_quant(slim.model, False)
    for p in slim.model.parameters():
        p.requires_grad_(True)
    slim.model.eval()
    summary["fake_quant_linears"] = n
    summary["target"] = config.qat_target.value
    summary["teacher_weight"] = config.qat_teacher_weight
    return summary


# ---- the job -------------------------------------------------------------------------------------------------


def quantize_job(model: str | Path, task: TaskData | None, config: QuantizeConfig, out: str | Path, *,
                 progress: bool = True) -> dict[str, Any]:
    """Load ``model``, quantize it with ``config.scheme``, save to ``out`` (atomically), reload the saved
    folder and score it on the eval split (if ``task`` has one). Returns the summary."""
    from slimformer.export import is_onnx_folder, load_runner

    out = models.check_out_dir(out)
    if config.needs_data and (task is None or not task.train):
        raise SlimformerError(f"scheme {config.scheme} needs training data (calibration or QAT); pass --data")
    if is_onnx_folder(model):
        raise SlimformerError(f"{model} is an ONNX model; quantize its PyTorch parent folder instead")
    t0 = time.time()
    slim = models.load(model, task.type, task.label_names) if task is not None else models.load(model)
    if slim.record.get("quantization"):
        raise SlimformerError(f"model {model} is already quantized ({slim.record['quantization'].get('scheme')}); "
                              "quantize its float parent")
    results: dict[str, Any] = {}
    if config.scheme == Scheme.QAT_INT8:
        work = out.parent / f".{out.name}.work"
        results["qat"] = quantization_aware_training(slim, task, config, work, progress=progress)  # type: ignore[arg-type]
    if config.target in ORT_SCHEMES:
        info: dict[str, Any] = {}

        def write(tmp: Path) -> None:
            slim.add_history("quantize", config.model_dump(mode="json"), results)
            info.update(quantize_onnx(slim, task, config, tmp, extra=results))

        models.atomic_dir(out, write)
    else:
        info = quantize_torch(slim, config)
        if results.get("qat"):
            info["qat"] = results["qat"]
        slim.add_history("quantize", config.model_dump(mode="json"), results)
        models.save(slim, out)
    if results.get("qat"):
        import shutil

        shutil.rmtree(out.parent / f".{out.name}.work", ignore_errors=True)

    from slimformer.measure import folder_size

    summary: dict[str, Any] = {"out": str(out), "scheme": config.scheme.value, "quantization": info,
                               "size_bytes": folder_size(out)}
    if task is not None and task.eval:
        from slimformer.evaluate import evaluate

        runner, tokenizer = load_runner(out, task)
        quality = evaluate(runner, tokenizer, task, "eval", max_length=config.max_length, progress=progress)
        models.update_record(out, quality={"eval": quality}, data=task.describe())
        summary["quality"] = quality
    summary["seconds"] = time.time() - t0
    return summary


__all__ = ["CalibrationMethod", "EmbeddingPrecision", "OutlierPolicy", "QatTarget", "QuantizeConfig", "Scheme",
           "quantization_aware_training", "quantize_job", "quantize_onnx", "quantize_torch", "quantized_state_dict",
           "replay_quantization"]
