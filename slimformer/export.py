"""ONNX export and ONNX Runtime inference.

An ONNX model folder holds ``model.onnx``, the tokenizer files, ``config.json`` (for reference) and
``slimformer.json`` with ``backend: onnxruntime``, the export check and, for quantized graphs, the scheme.
It is scored by the same evaluation code as PyTorch models through :class:`OrtRunner` (a Runner: padded
batch dict -> logits tensor), and its cost card comes from :func:`measure_onnx`.

The export uses the ``torch.export``-based exporter with dynamic batch and sequence axes and is checked
against PyTorch on padded batches of several shapes before it is written.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.evaluate import MODEL_INPUTS
from slimformer.quantizer import conv1d_as_linear
from slimformer.tasks import TaskType

ONNX_FILE = "model.onnx"
# Opset 23 has the ONNX Attention operator: torch.onnx exports scaled_dot_product_attention as one node, which
# ONNX Runtime runs as one kernel. Opset 18 spells it out (MatMul, Where/IsNaN masking, Softmax, MatMul): a
# quantized 3-layer MiniLM at b1 s128 took 10.6 ms there against 7.9 ms at opset 23 (1 thread, this CPU).
DEFAULT_OPSET = 23
# Models with rotary position embeddings (Llama and kin) export at 18: at 23 the exporter emits the
# RotaryEmbedding operator, whose ONNX Runtime 1.32 kernel rejects the cos/sin caches it is given.
ROTARY_OPSET = 18
# ONNX Runtime graph fusions left off in every session. SkipLayerNormFusion folds residual Add + LayerNorm into
# one kernel that is slower than the two it replaces on the CPUs we measured (AMD EPYC, AVX-512): the fine-tuned
# MiniLM in ORT dynamic int8 at b1 s128 ran 16.8 ms fused and 13.4 ms unfused at 1 thread, 9.0 vs 7.7 ms at 2.
DISABLED_FUSIONS = ("SkipLayerNormFusion",)
BACKEND = "onnxruntime"


class ExportFormat(StrEnum):
    ONNX = "onnx"


@contextlib.contextmanager
def quiet():
    """Keep exporter and quantizer chatter (progress prints on stdout, root-logger warnings, torchao's notes
    about optional CUDA libraries) away from the user's terminal and from ``--json`` output."""
    loggers = {name: logging.getLogger(name) for name in ("", "torchao", "torch.utils._pytree", "torch.onnx",
                                                          "torch.onnx._internal.exporter._registration")}
    levels = {name: lg.level for name, lg in loggers.items()}
    for lg in loggers.values():
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


def is_onnx_folder(path: str | os.PathLike) -> bool:
    """True for a folder (or file) that holds an ONNX model slimformer can run."""
    p = Path(path)
    return (p.is_dir() and (p / ONNX_FILE).exists()) or (p.is_file() and p.suffix == ".onnx")


class _LogitsOnly(nn.Module):
    """Named tensor inputs in, logits out: the graph interface every runner expects."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names
        # Decoders: logits of the whole sequence, no key/value cache in the graph.
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.model(**{k: given[k] for k in self.input_names}, **self.extra).logits


def is_causal_lm(model: nn.Module) -> bool:
    """A decoder with a language-modelling head (GPT-2, Llama, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def model_input_names(model: nn.Module, tokenizer) -> list[str]:
    """The standard inputs the model's forward takes and the tokenizer produces (token types only if both, and
    never for a causal LM: GPT-2 would add an embedding for them that training never saw)."""
    accepted = set(inspect.signature(model.forward).parameters)
    produced = set(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"])
    if is_causal_lm(model):
        produced.discard("token_type_ids")
    return [k for k in MODEL_INPUTS if k in accepted and (k != "token_type_ids" or k in produced)]


def _check_batches(tokenizer, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Padded batches of a few shapes (the export must not have frozen batch or sequence size)."""
    from slimformer.measure import dummy_batch

    out = []
    for i, (b, s) in enumerate(((1, 8), (3, 37), (2, 64))):
        batch = dummy_batch(tokenizer, b, s, seed=100 + i)
        if b > 1:
            batch["attention_mask"][-1, s // 2:] = 0  # a padded row: the mask path must be exported too
            batch["input_ids"][-1, s // 2:] = tokenizer.pad_token_id or 0
        out.append({k: v for k, v in batch.items() if k in names})
    return out


def _float_model(slim: models.SlimModel) -> nn.Module:
    if slim.record.get("quantization"):
        scheme = slim.record["quantization"].get("scheme")
        raise SlimformerError(f"model is quantized for PyTorch ({scheme}) and cannot be exported; export its float "
                              "parent, or quantize it with an ort-* scheme")
    return slim.model.eval()


def default_opset(model: nn.Module) -> int:
    """The opset a model exports at unless one is asked for: DEFAULT_OPSET, or ROTARY_OPSET for models with
    rotary position embeddings."""
    rotary = any("Rotary" in type(m).__name__ for m in model.modules())
    return ROTARY_OPSET if rotary else DEFAULT_OPSET


def export_onnx(slim: models.SlimModel, folder: str | os.PathLike, *, opset: int | None = None,
                atol: float = 1e-4, write_extras: bool = True) -> dict[str, Any]:
    """Export ``slim`` to ``folder/model.onnx`` (dynamic batch and sequence axes), check it against
    PyTorch on padded batches, and (with ``write_extras``) write tokenizer, config and record next to it.
    ``opset`` None: ``default_opset`` of the model.

    Returns the export facts: path, opset, inputs, the largest absolute logit difference and the check."""
    import onnxruntime  # noqa: F401  (fail early with a clear message below if missing)

    model = _float_model(slim)
    opset = opset or default_opset(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = model_input_names(model, slim.tokenizer)
    wrapper = _LogitsOnly(model, names).eval()
    example = _check_batches(slim.tokenizer, names)[2]  # batch 2, seq 64: neither size may be specialised
    batch_dim, seq_dim = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {k: {0: batch_dim, 1: seq_dim} for k in names}
    # One self-contained file unless protobuf's 2 GB limit forces the weights into model.onnx.data.
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
    t0 = time.time()
    path = folder / ONNX_FILE
    # GPT-2's Conv1D exports as Gemm, which ONNX Runtime's quantizers skip; the equivalent Linear gives MatMul.
    with quiet(), torch.inference_mode(False), torch.no_grad(), conv1d_as_linear(model):
        try:
            torch.onnx.export(wrapper, tuple(example[k] for k in names), str(path), input_names=names,
                              output_names=["logits"], opset_version=opset, dynamo=True,
                              dynamic_shapes=dynamic, verbose=False, external_data=external)
        except Exception as e:  # the exporter's failures are long; keep the first line and say what to try
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise SlimformerError(f"ONNX export failed ({type(e).__name__}: {first}); try another --opset "
                                  "or report the model family") from None
    seconds = time.time() - t0
    diff = check_onnx(wrapper, path, _check_batches(slim.tokenizer, names))  # against the original modules
    facts = {"file": ONNX_FILE, "opset": opset, "inputs": names, "outputs": ["logits"],
             "dynamic_axes": {"0": "batch", "1": "sequence"}, "max_abs_diff": diff, "atol": atol,
             "export_seconds": seconds, "exporter": f"torch.onnx (dynamo) {torch.__version__}"}
    if not diff <= atol:
        raise SlimformerError(f"the ONNX graph differs from PyTorch by {diff:.2e} > atol {atol:.0e}; "
                              "export in fp32 or raise --atol if this is expected")
    if write_extras:
        strip_debug_info(path)
        write_onnx_folder(slim, folder, {"export": facts})
    return facts


def strip_debug_info(path: Path) -> None:
    """Drop the exporter's per-node debug metadata (source stack traces, module scopes) from the graph at
    ``path``: at opset 23 it is kept in the file and weighs about 0.2 MB for two BERT layers, 3% of a
    quantized 3-layer MiniLM. Graphs with external weight files are left as they are."""
    import onnx

    if not path.exists() or path.with_name(path.name + ".data").exists():
        return
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.save(proto, str(path))


def check_onnx(reference: nn.Module, onnx_path: Path, batches: list[dict[str, torch.Tensor]]) -> float:
    """Largest absolute difference between PyTorch and ONNX Runtime logits over ``batches``."""
    runner = OrtRunner(onnx_path, threads=1)
    worst = 0.0
    with torch.inference_mode():
        for batch in batches:
            ref = reference(*batch.values()).float()
            got = runner(batch)
            worst = max(worst, float((ref - got).abs().max()))
    return worst


def write_onnx_folder(slim: models.SlimModel, folder: Path, onnx_facts: dict[str, Any],
                      quantization: dict[str, Any] | None = None) -> None:
    """Tokenizer, config.json and slimformer.json beside model.onnx."""
    tok = getattr(slim.tokenizer, "base_tokenizer", slim.tokenizer)
    tok.save_pretrained(folder)
    slim.model.config.save_pretrained(folder)
    record = dict(slim.record)
    record["task"] = {"type": str(slim.task_type), "label_names": slim.label_names}
    record["backend"] = BACKEND
    record["onnx"] = {**record.get("onnx", {}), **onnx_facts}
    record.setdefault("versions", models.library_versions())
    # The folder's own scheme (with backend onnxruntime) or none: a PyTorch scheme inherited from the
    # source record would describe weights that are not in this folder.
    record.pop("quantization", None)
    if quantization is not None:
        record["quantization"] = quantization
    models.write_record(folder, record)


class OrtRunner:
    """An ONNX Runtime session as an evaluation Runner: batch dict of tensors in, float logits tensor out.

    ``path`` is an ONNX model folder or a ``.onnx`` file. Inputs are matched by the session's input
    names; a missing ``token_type_ids`` is filled with zeros (single-segment text)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        import onnxruntime as ort

        p = Path(path)
        onnx_path = p / ONNX_FILE if p.is_dir() else p
        if not onnx_path.exists():
            raise SlimformerError(f"no ONNX model at {onnx_path}; export one with `slimformer export --model DIR`")
        self.folder = onnx_path.parent
        self.onnx_path = onnx_path
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # warnings about unused initializers etc. are noise for users
        if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
            # The same choice as PyTorch's OpenMP threads: on a shared CPU, threads that busy-wait between
            # operators steal the cores the other threads (or processes) need.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"],
                                                disabled_optimizers=list(DISABLED_FUSIONS))
        except Exception as e:
            raise SlimformerError(f"ONNX Runtime cannot load {onnx_path} ({str(e).splitlines()[0][:150]}); "
                                  "re-export the model") from None
        self.threads = threads
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.record = models.read_record(self.folder) if (self.folder / models.RECORD_FILE).exists() else {}
        task = self.record.get("task", {})
        self.task_type = TaskType(task["type"]) if task.get("type") else None
        self.label_names = task.get("label_names")

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]
        feeds = {}
        for name in self.input_names:
            value = batch.get(name)
            if value is None:
                if name != "token_type_ids":
                    raise SlimformerError(f"the ONNX model needs input '{name}' but the batch has only "
                                          f"{sorted(batch)}; tokenize with the model's tokenizer")
                value = torch.zeros_like(torch.as_tensor(ids))
            feeds[name] = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.int64)
        return torch.from_numpy(self.session.run([self.output_name], feeds)[0]).float()

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0][:100]
            raise SlimformerError(f"ONNX folder {self.folder} has no usable tokenizer ({first}); "
                                  "re-export with slimformer") from None
        if self.record.get("vocab_map"):  # a vocabulary-pruned graph reads remapped token ids
            from slimformer.surgery import wrap_tokenizer

            tok = wrap_tokenizer(tok, self.record["vocab_map"])
        return tok


def load_onnx_runner(folder: str | os.PathLike, *, threads: int | None = None) -> OrtRunner:
    """The runner of an ONNX model folder, with its tokenizer, task type and labels loaded (for serving)."""
    runner = OrtRunner(folder, threads=threads)
    if runner.task_type is None:
        raise SlimformerError(f"{runner.folder} has no slimformer.json with the task; export it with slimformer")
    _ = runner.tokenizer  # load now, so a broken folder fails at start-up rather than on the first request
    return runner


def load_runner(model: str | os.PathLike, task=None, *, threads: int | None = None):
    """(runner, tokenizer) for any saved model: an ONNX folder runs on ONNX Runtime, anything else is loaded
    with :func:`slimformer.models.load` (quantization replayed) and runs in PyTorch. ``task`` (TaskData)
    checks that the labels fit."""
    from slimformer.evaluate import torch_runner

    if is_onnx_folder(model):
        runner = load_onnx_runner(model, threads=threads)
        if task is not None:
            if runner.task_type != task.type:
                raise SlimformerError(f"ONNX model {model} was made for {runner.task_type}, not {task.type}; "
                                      "use data of its task")
            if task.label_names is not None and runner.label_names is not None \
                    and list(task.label_names) != list(runner.label_names):
                raise SlimformerError(f"ONNX model {model} has labels {runner.label_names[:9]} but the data has "
                                      f"{list(task.label_names)[:9]}; use data with the model's labels")
        return runner, runner.tokenizer
    slim = models.load(model, task.type if task else None, task.label_names if task else None)
    return torch_runner(slim.model), slim.tokenizer


def onnx_size(folder: str | os.PathLike) -> int:
    from slimformer.measure import folder_size

    p = Path(folder)
    return folder_size(p, ("*.onnx", "*.onnx.data")) if p.is_dir() else p.stat().st_size


def measure_onnx(folder: str | os.PathLike, *, batch: int = 1, seq: int = 128, threads: int | None = None,
                 warmup: int = 5, runs: int = 30) -> dict[str, Any]:
    """The cost card of an ONNX model: size of the .onnx file(s), latency, throughput, memory, hardware."""
    from slimformer.measure import dummy_batch, hardware, measure_runner

    threads = threads or torch.get_num_threads()
    runner = OrtRunner(folder, threads=threads)
    inputs = {k: v for k, v in dummy_batch(runner.tokenizer, batch, seq).items() if k in runner.input_names}
    timing = measure_runner(runner, inputs, batch=batch, seq=seq, threads=threads, warmup=warmup, runs=runs)
    import onnx

    graph = onnx.load(str(runner.onnx_path), load_external_data=False).graph
    n_weights = sum(int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) >= 1)
    card: dict[str, Any] = {"backend": BACKEND, "parameters": n_weights}
    card["size_bytes"] = onnx_size(runner.folder)
    card["size_mb"] = card["size_bytes"] / 1e6
    card["flops"] = None
    card.update(timing)
    q = runner.record.get("quantization")
    card["dtype"] = q["weights"] if q else "float32"
    card["quantization"] = q["scheme"] if q else None
    card["hardware"] = hardware()
    card["note"] = (f"ONNX Runtime CPUExecutionProvider, fusions off: {', '.join(DISABLED_FUSIONS)}; "
                    "parameters = elements of the graph's weight tensors")
    return card


def export_job(model_dir: str | os.PathLike, format: ExportFormat | str = ExportFormat.ONNX,
               out: str | os.PathLike | None = None, *, opset: int | None = None, atol: float = 1e-4
               ) -> dict[str, Any]:
    """Export a saved model folder; the result goes to ``out`` (default: ``<model_dir>-onnx``), atomically."""
    try:
        fmt = ExportFormat(format)
    except ValueError:
        raise SlimformerError(f"unknown export format '{format}'; use one of "
                              f"{', '.join(f.value for f in ExportFormat)}") from None
    if is_onnx_folder(model_dir):
        raise SlimformerError(f"{model_dir} is already an ONNX model; export its PyTorch parent folder")
    src = Path(model_dir)
    out = Path(out) if out is not None else src.parent / f"{src.name}-{fmt.value}"
    if out.resolve() == src.resolve():
        raise SlimformerError("--out must differ from --model; the export is a separate folder")
    models.check_out_dir(out)
    slim = models.load(model_dir)
    _float_model(slim)
    facts: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        facts.update(export_onnx(slim, tmp, opset=opset, atol=atol))

    t0 = time.time()
    models.atomic_dir(out, write)
    return {"out": str(out), "format": fmt.value, **facts, "size_bytes": onnx_size(out),
            "seconds": time.time() - t0}


__all__ = ["ExportFormat", "OrtRunner", "export_job", "export_onnx", "is_onnx_folder", "load_onnx_runner",
           "is_causal_lm", "load_runner", "measure_onnx", "model_input_names", "onnx_size"]
