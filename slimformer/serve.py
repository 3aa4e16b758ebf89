"""Serve a saved model over HTTP: ``POST /predict``, ``GET /health``, ``/metadata``, ``/metrics``.

One process holds one model. Requests are parsed and validated on the asyncio event loop; inference runs in
a single worker thread, so the loop stays free to accept requests while the model computes. With micro-batching
on, requests that arrive within ``max_wait_ms`` of each other (or while the previous batch is still running) are
joined into one padded forward pass of up to ``max_batch`` texts: a CPU transformer does a batch of 16 short texts
in far less than 16 times the time of one.

Bad input never reaches the model: the body size is checked before JSON is parsed (413), malformed JSON is a
400, wrong fields or types a 422, and the per-request limits (texts per request, characters per text) a 413. Every
error is a JSON object ``{"error": "<one line>"}``.

No ``from __future__ import annotations`` here on purpose: FastAPI reads the endpoint annotations at run time,
and the request model is built per server (its limits come from the config), so it is a local class.
"""

import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from slimformer import models
from slimformer.errors import SlimformerError
from slimformer.evaluate import MODEL_INPUTS, Runner, torch_runner
from slimformer.tasks import TaskType, collate

log = logging.getLogger("slimformer.serve")

ONNX_FILE = "model.onnx"
# Logits of a causal LM are (batch, tokens, vocabulary) floats: cap one forward pass at about 256 MB of them.
LM_LOGIT_BUDGET = 64 * 2**20
KEEP_ALIVE_S = 75


class Backend(StrEnum):
    AUTO = "auto"
    TORCH = "torch"
    ONNX = "onnx"


class ServeConfig(BaseModel):
    """How the server batches and what it accepts (host and port belong to the process, not here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Backend = Field(Backend.AUTO, description="torch | onnx | auto (ONNX Runtime when the folder has "
                                                       "model.onnx, else PyTorch)")
    batching: bool = Field(True, description="join concurrent requests into one forward pass")
    max_batch: int = Field(32, ge=1, le=1024, description="most texts in one forward pass")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="longest a request waits for others to join its batch")
    max_queue: int = Field(1024, ge=1, le=100_000,
                           description="requests waiting or running at once; beyond that new ones get 503")
    max_texts: int = Field(64, ge=1, le=10_000, description="most texts in one request (else 413)")
    max_chars: int = Field(5_000, ge=1, le=1_000_000, description="most characters in one text (else 413)")
    max_body_bytes: int = Field(1_000_000, ge=256, le=100_000_000,
                                description="largest request body in bytes, checked before JSON parsing (else 413)")
    max_length: int = Field(128, ge=8, le=8192,
                            description="tokens per text the model sees: classification and NER truncate longer "
                                        "texts; causal LM scores them with a sliding window")
    threads: int | None = Field(None, ge=1, le=256, description="PyTorch intra-op threads (default: all cores)")


# --------------------------------------------------------------------------------------------------
# The model behind the server
# --------------------------------------------------------------------------------------------------


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _load_tokenizer(folder: Path, record: dict[str, Any]):
    """The tokenizer as :func:`models.load` prepares it, without loading PyTorch weights (ONNX folders)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise SlimformerError(f"model folder {folder} has no usable tokenizer ({str(e).splitlines()[0][:120]}); "
                              "save the tokenizer files next to the model") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if record.get("vocab_map"):
        from slimformer.surgery import wrap_tokenizer

        tok = wrap_tokenizer(tok, record["vocab_map"])
    return tok


def _onnx_runner(folder: Path, threads: int | None) -> Runner:
    try:
        from slimformer.export import load_onnx_runner
    except ImportError:
        raise SlimformerError("the ONNX backend needs slimformer.export, which this installation lacks; "
                              "use --backend torch") from None
    return load_onnx_runner(folder, threads=threads) if threads else load_onnx_runner(folder)


def pick_backend(folder: Path, backend: Backend) -> Backend:
    """auto -> onnx when the folder holds an ONNX export (and the exporter's runner is importable), else torch."""
    has_onnx = (folder / ONNX_FILE).exists()
    if backend == Backend.ONNX and not has_onnx:
        raise SlimformerError(f"model folder {folder} has no {ONNX_FILE}; export it first or use --backend torch")
    if backend != Backend.AUTO:
        return backend
    if not has_onnx:
        return Backend.TORCH
    try:
        import slimformer.export  # noqa: F401
    except ImportError:
        if any(folder.glob("*.safetensors")):
            log.warning("%s has %s but slimformer.export is missing; serving the PyTorch weights", folder, ONNX_FILE)
            return Backend.TORCH
        raise SlimformerError(f"model folder {folder} has only {ONNX_FILE} and this installation lacks "
                              "slimformer.export to run it; install the full slimformer") from None
    return Backend.ONNX


class Predictor:
    """Texts in, JSON-ready predictions out; synchronous (the server calls it from its worker thread)."""

    def __init__(self, folder: str | Path, backend: Backend = Backend.AUTO, max_length: int = 128,
                 max_batch: int = 32, threads: int | None = None):
        folder = Path(folder)
        if not folder.is_dir():
            raise SlimformerError(f"model folder {folder} does not exist; give a saved slimformer model folder")
        if threads:
            torch.set_num_threads(threads)
        self.folder = folder
        self.backend = pick_backend(folder, Backend(backend))
        if self.backend == Backend.TORCH:
            slim = models.load(folder)
            self.tokenizer, self.task_type, self.labels = slim.tokenizer, slim.task_type, slim.label_names or []
            self.record = slim.record
            self.runner: Runner = torch_runner(slim.model)
            positions = getattr(slim.config, "max_position_embeddings", None)
        else:
            self.record = models.read_record(folder)
            task = self.record.get("task", {})
            if not task.get("type"):
                raise SlimformerError(f"model folder {folder} has no task in {models.RECORD_FILE}; "
                                      "serve a folder written by slimformer")
            self.task_type, self.labels = TaskType(task["type"]), list(task.get("label_names") or [])
            self.runner = _onnx_runner(folder, threads)
            # The exporter's runner brings the tokenizer it was checked with (vocabulary map included).
            self.tokenizer = getattr(self.runner, "tokenizer", None) or _load_tokenizer(folder, self.record)
            positions = _config_positions(folder)
        if self.task_type != TaskType.CAUSAL_LM and not self.labels:
            raise SlimformerError(f"model folder {folder} records no label names; re-save it with slimformer")
        # Never feed more tokens than the position table has: the model would fail on long texts.
        self.max_length = min(max_length, positions) if positions else max_length
        self.max_batch = max_batch
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else 0

    @property
    def name(self) -> str:
        return self.folder.resolve().name

    def __call__(self, texts: list[str]) -> list[dict[str, Any]]:
        if not texts:
            return []
        if self.task_type == TaskType.SEQUENCE_CLASSIFICATION:
            return self._classify(texts)
        if self.task_type == TaskType.TOKEN_CLASSIFICATION:
            return self._entities(texts)
        return self._perplexity(texts)

    def _logits(self, features: list[dict[str, Any]], chunk: int) -> list[torch.Tensor]:
        """Logits per feature, run in length-sorted chunks so padding stays small."""
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        out: list[torch.Tensor | None] = [None] * len(features)
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            batch = collate([{k: v for k, v in features[i].items() if k in MODEL_INPUTS} for i in idx], self.pad_id)
            logits = torch.as_tensor(self.runner(batch)).float()
            for j, i in enumerate(idx):
                out[i] = logits[j] if logits.ndim == 2 else logits[j, :len(features[i]["input_ids"])]
        return out  # type: ignore[return-value]

    def _encode(self, texts: list[str], **kwargs: Any) -> tuple[Any, list[dict[str, Any]]]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, **kwargs)
        keys = [k for k in MODEL_INPUTS if k in enc]
        return enc, [{k: enc[k][i] for k in keys} for i in range(len(texts))]

    def _classify(self, texts: list[str]) -> list[dict[str, Any]]:
        _, feats = self._encode(texts)
        results = []
        for logits in self._logits(feats, self.max_batch):
            probs = torch.softmax(logits, dim=-1).tolist()
            best = max(range(len(probs)), key=probs.__getitem__)
            results.append({"label": self.labels[best],
                            "scores": {name: _finite(p) or 0.0 for name, p in zip(self.labels, probs, strict=True)}})
        return results

    def _entities(self, texts: list[str]) -> list[dict[str, Any]]:
        # Like training (tasks.encode): a word's label is the label of its first sub-word. Words are the fast
        # tokenizer's pre-tokens (whitespace and punctuation split, as in CoNLL), spans come from its offsets.
        enc, feats = self._encode(texts, return_offsets_mapping=True)
        results = []
        for i, (text, logits) in enumerate(zip(texts, self._logits(feats, self.max_batch), strict=True)):
            probs = torch.softmax(logits, dim=-1)
            offsets = enc["offset_mapping"][i]
            words: list[list[Any]] = []  # [start, end, label, score]
            prev = None
            for pos, w in enumerate(enc.word_ids(i)):
                if w is None:
                    continue
                if w != prev:
                    k = int(probs[pos].argmax())
                    words.append([offsets[pos][0], offsets[pos][1], self.labels[k], float(probs[pos, k])])
                else:
                    words[-1][1] = offsets[pos][1]
                prev = w
            last_end = words[-1][1] if words else 0
            results.append({"entities": merge_entities(text, words), "truncated": bool(text[last_end:].strip())})
        return results

    def _perplexity(self, texts: list[str]) -> list[dict[str, Any]]:
        from slimformer.evaluate import perplexity

        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        results: list[dict[str, Any] | None] = [None] * len(texts)
        short = [i for i, x in enumerate(ids) if len(x) <= self.max_length]
        for i, x in enumerate(ids):
            if len(x) > self.max_length:  # long texts: the evaluation's sliding window, one text at a time
                r = perplexity(self.runner, self.tokenizer, [{"text": texts[i]}], max_length=self.max_length,
                               bootstrap=0)
                results[i] = {"perplexity": _finite(r["value"]), "tokens": r["n"]}
        vocab = len(self.tokenizer)
        chunk = max(1, min(self.max_batch, LM_LOGIT_BUDGET // max(1, self.max_length * vocab)))
        feats = [{"input_ids": ids[i], "attention_mask": [1] * len(ids[i])} for i in short]
        scorable = [j for j, f in enumerate(feats) if len(f["input_ids"]) >= 2]
        for i in short:
            results[i] = {"perplexity": None, "tokens": 0}  # fewer than 2 tokens: nothing to predict
        if scorable:
            logits = self._logits([feats[j] for j in scorable], chunk)
            for j, lg in zip(scorable, logits, strict=True):
                tgt = torch.tensor(feats[j]["input_ids"][1:])
                nll = -torch.log_softmax(lg[:-1], dim=-1).gather(1, tgt.unsqueeze(1)).squeeze(1)
                results[short[j]] = {"perplexity": _finite(math.exp(float(nll.mean()))), "tokens": int(tgt.numel())}
        return results  # type: ignore[return-value]


def _config_positions(folder: Path) -> int | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg.get("max_position_embeddings") or cfg.get("n_positions")


def merge_entities(text: str, words: list[list[Any]]) -> list[dict[str, Any]]:
    """Join word labels into entities: B-X starts one, I-X continues an X (or starts one if none is open,
    as a lenient reader of imperfect predictions should), O closes. Labels without a prefix act like I-X."""
    entities: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for start, end, label, score in words:
        if label == "O":
            current = None
            continue
        prefix, kind = (label[:1], label[2:]) if label[:2] in ("B-", "I-") else ("I", label)
        if prefix == "B" or current is None or current["entity"] != kind:
            current = {"entity": kind, "start": start, "end": end, "scores": [score]}
            entities.append(current)
        else:
            current["end"] = end
            current["scores"].append(score)
    return [{"entity": e["entity"], "text": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"],
             "score": sum(e["scores"]) / len(e["scores"])} for e in entities]


# --------------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, written by hand: three metric families do not need a dependency)
# --------------------------------------------------------------------------------------------------

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ENDPOINTS = ("/predict", "/health", "/metadata", "/metrics", "/openapi.json", "/docs")


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.n += 1
        self.total += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}')
        suffix = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{suffix} {self.total:.6f}", f"{name}_count{suffix} {self.n}"]


class Metrics:
    """Counters and histograms, updated only on the event loop (so no locks)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.inference = Histogram(LATENCY_BUCKETS)
        self.texts = 0
        self.in_flight = 0

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"  # bounded label values, whatever clients send
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, n_texts: int, seconds: float) -> None:
        self.batch_size.observe(n_texts)
        self.inference.observe(seconds)
        self.texts += n_texts

    def render(self) -> str:
        lines = ["# HELP slimformer_requests_total HTTP requests answered, by endpoint and status code.",
                 "# TYPE slimformer_requests_total counter"]
        lines += [f'slimformer_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        lines += ["# HELP slimformer_request_errors_total Requests answered with a 4xx or 5xx status.",
                  "# TYPE slimformer_request_errors_total counter"]
        errors: dict[tuple[str, str], int] = {}
        for (e, s), n in self.requests.items():
            if s >= 400:
                key = (e, "client" if s < 500 else "server")
                errors[key] = errors.get(key, 0) + n
        lines += [f'slimformer_request_errors_total{{endpoint="{e}",kind="{k}"}} {n}'
                  for (e, k), n in sorted(errors.items())]
        lines += ["# HELP slimformer_request_duration_seconds Time from request received to response sent.",
                  "# TYPE slimformer_request_duration_seconds histogram"]
        for e, h in sorted(self.latency.items()):
            lines += h.lines("slimformer_request_duration_seconds", f'endpoint="{e}"')
        lines += ["# HELP slimformer_batch_size Texts per forward pass (micro-batching joins requests).",
                  "# TYPE slimformer_batch_size histogram", *self.batch_size.lines("slimformer_batch_size"),
                  "# HELP slimformer_inference_seconds Time of one batch in the worker thread (tokenize + model).",
                  "# TYPE slimformer_inference_seconds histogram",
                  *self.inference.lines("slimformer_inference_seconds"),
                  "# HELP slimformer_texts_total Texts predicted.", "# TYPE slimformer_texts_total counter",
                  f"slimformer_texts_total {self.texts}",
                  "# HELP slimformer_requests_in_flight Predict requests waiting or running.",
                  "# TYPE slimformer_requests_in_flight gauge", f"slimformer_requests_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------------------------------


class ServerBusy(Exception):
    """Too many requests waiting; the client should retry later (503)."""


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    enqueued: float


class Batcher:
    """One queue, one worker coroutine, one inference thread.

    The worker takes the oldest request, then keeps taking more until ``max_batch`` texts are gathered or
    ``max_wait`` has passed since that oldest request arrived; requests that queued up while the previous
    batch ran are therefore taken at once, with no extra wait. Without batching every request is its own batch,
    still on the one inference thread (the model is not run concurrently: PyTorch already uses all cores).
    """

    def __init__(self, predict: Callable[[list[str]], list[dict[str, Any]]], config: ServeConfig, metrics: Metrics):
        self.predict = predict
        self.config = config
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimformer-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._arrived: asyncio.Event | None = None
        self.pending = 0

    def _ensure_started(self) -> None:
        # Started lazily on the loop that serves requests (TestClient and uvicorn each bring their own loop).
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        self._loop, self._queue, self._arrived = loop, asyncio.Queue(), asyncio.Event()
        self._task = loop.create_task(self._worker(), name="slimformer-batcher")

    @property
    def alive(self) -> bool:
        return not self.config.batching or self._task is None or not self._task.done()

    async def submit(self, texts: list[str]) -> list[dict[str, Any]]:
        if self.pending >= self.config.max_queue:
            raise ServerBusy(f"{self.pending} requests are waiting (limit {self.config.max_queue}); retry shortly")
        self.pending += 1
        self.metrics.in_flight = self.pending
        try:
            if not self.config.batching:
                return await self._run(texts)
            self._ensure_started()
            assert self._queue is not None and self._arrived is not None
            job = _Job(texts, asyncio.get_running_loop().create_future(), time.perf_counter())
            self._queue.put_nowait(job)
            self._arrived.set()
            return await job.future
        finally:
            self.pending -= 1
            self.metrics.in_flight = self.pending

    async def _run(self, texts: list[str]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self.executor, self.predict, texts)
        self.metrics.observe_batch(len(texts), time.perf_counter() - t0)
        return out

    async def _gather(self) -> list[_Job]:
        assert self._queue is not None and self._arrived is not None
        first = await self._queue.get()
        jobs, n = [first], len(first.texts)
        deadline = first.enqueued + self.config.max_wait_ms / 1000
        while n < self.config.max_batch:
            while not self._queue.empty() and n < self.config.max_batch:
                job = self._queue.get_nowait()
                jobs.append(job)
                n += len(job.texts)
            remaining = deadline - time.perf_counter()
            if n >= self.config.max_batch or remaining <= 0:
                break
            # An Event rather than wait_for(queue.get()): a timed-out get could drop a job on Python 3.11.
            self._arrived.clear()
            if self._queue.empty():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
        return jobs

    async def _worker(self) -> None:
        while True:
            try:
                jobs = [j for j in await self._gather() if not j.future.done()]  # skip clients that left
                if not jobs:
                    continue
                texts = [t for j in jobs for t in j.texts]
                try:
                    results = await self._run(texts)
                except Exception as e:
                    # A failed batch of several requests fails no one yet: rerun them one by one, so only the
                    # request that breaks the model gets the error (and the worker lives on either way).
                    if len(jobs) == 1:
                        if not jobs[0].future.done():
                            jobs[0].future.set_exception(e)
                    else:
                        for j in jobs:
                            await self._run_alone(j)
                    continue
                s = 0
                for j in jobs:
                    if not j.future.done():
                        j.future.set_result(results[s:s + len(j.texts)])
                    s += len(j.texts)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - defensive: keep serving whatever happened
                log.exception("batcher error")

    async def _run_alone(self, job: _Job) -> None:
        if job.future.done():
            return
        try:
            result = await self._run(job.texts)
        except Exception as e:
            if not job.future.done():
                job.future.set_exception(e)
            return
        if not job.future.done():
            job.future.set_result(result)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self.executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# The HTTP app
# --------------------------------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: records every request in the metrics and refuses bodies over the limit with 413 before
    anything parses them (a declared Content-Length is refused without reading a byte)."""

    def __init__(self, app: Any, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            body_receive = await self._read_body(scope, receive)
            if body_receive is None:
                await _send_json(send_status, 413, f"request body is larger than {self.max_bytes} bytes; "
                                                   "send fewer or shorter texts")
                return
            await self.app(scope, body_receive, send_status)
        finally:
            self.metrics.observe_request(scope.get("path", ""), status, time.perf_counter() - t0)

    async def _read_body(self, scope: dict, receive: Callable) -> Callable | None:
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client disconnected: let the app see it
                return receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:  # chunked bodies have no Content-Length: count while reading
                return None
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_json(send: Callable, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class ClassPrediction(BaseModel):
    label: str = Field(description="the most probable label")
    scores: dict[str, float] = Field(description="probability of every label (softmax)")


class Entity(BaseModel):
    entity: str = Field(description="entity type, e.g. PER (from B-PER/I-PER word labels)")
    text: str = Field(description="the entity's characters, text[start:end]")
    start: int = Field(description="character offset of the first character")
    end: int = Field(description="character offset after the last character")
    score: float = Field(description="mean probability of the entity's word labels")


class TokenPrediction(BaseModel):
    entities: list[Entity] = Field(description="entities in order of appearance")
    truncated: bool = Field(description="true when the text was longer than max_length tokens and its end unread")


class LMPrediction(BaseModel):
    perplexity: float | None = Field(description="exp(mean negative log-likelihood per token); null if the text "
                                                 "has fewer than 2 tokens")
    tokens: int = Field(description="tokens scored")


class PredictResponse(BaseModel):
    model: str = Field(description="the served model folder's name")
    task: str = Field(description="sequence-classification | token-classification | causal-lm")
    backend: str = Field(description="torch or onnx")
    predictions: list[ClassPrediction | TokenPrediction | LMPrediction] = Field(
        description="one per input text, in order")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in one line")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "the body is not valid JSON"), (413, "body, text count or text length over the limit"),
        (422, "wrong fields or types"), (503, "too many requests waiting"))
}


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
              type(None): "null"}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[int, str]:
    """(status, one line) for pydantic errors: 400 for unparsable JSON, 413 for the size limits, else 422."""
    first = errors[0]
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return 422, "the request body is empty; send a JSON object such as {\"text\": \"...\"}"
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "invalid JSON")
        return 400, f"request body is not valid JSON ({why}); send e.g. {{\"text\": \"...\"}}"
    for e in errors:
        loc = [x for x in e.get("loc", ()) if x != "body"]
        ctx = e.get("ctx") or {}
        if e.get("type") == "too_long" and loc == ["texts"]:
            return 413, f"too many texts: {ctx.get('actual_length')} (limit {ctx.get('max_length')} per request); " \
                        "split them over several requests"
        if e.get("type") == "string_too_long" and loc and loc[0] in ("text", "texts"):
            where = "text" if loc[0] == "text" else f"texts[{loc[1]}]"
            return 413, f"{where} is longer than {ctx.get('max_length')} characters; shorten or split it"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{loc}' (allowed: text, texts)")
        elif e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            given = e.get("input")
            if isinstance(given, bytes):  # FastAPI parses JSON only when the Content-Type says JSON
                parts.append("the body must be a JSON object such as {\"text\": \"...\"} sent with "
                             "Content-Type: application/json")
            else:
                kind = JSON_TYPES.get(type(given), type(given).__name__)
                parts.append(f"the body must be a JSON object such as {{\"text\": \"...\"}}, not {kind}")
        elif e.get("type") == "too_short" and loc == "texts":
            parts.append("texts is empty; give at least one text")
        else:
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            parts.append(msg if loc == "body" else f"{loc}: {msg}")
    return 422, "; ".join(parts)


def create_app(model: str | Path | Predictor, config: ServeConfig | None = None) -> Any:
    """Build the FastAPI app for a saved model folder (or a ready :class:`Predictor`)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    config = config or ServeConfig()
    predictor = model if isinstance(model, Predictor) else Predictor(
        model, config.backend, config.max_length, config.max_batch, config.threads)
    metrics = Metrics()
    batcher = Batcher(predictor, config, metrics)
    started = time.time()
    max_chars, max_texts = config.max_chars, config.max_texts
    Text = Annotated[str, StringConstraints(max_length=max_chars)]

    class PredictRequest(BaseModel):
        """One text or a batch of texts (exactly one of the two fields)."""

        model_config = ConfigDict(extra="forbid", strict=True, title="PredictRequest")

        text: Text | None = Field(None, description=f"one text (at most {max_chars} characters)",
                                  examples=["a charming and often affecting journey"])
        texts: list[Text] | None = Field(None, min_length=1, max_length=max_texts,
                                         description=f"1 to {max_texts} texts of at most {max_chars} characters each")

        @model_validator(mode="after")
        def _one_of(self) -> "PredictRequest":
            if (self.text is None) == (self.texts is None):
                raise ValueError("give exactly one of 'text' (a string) or 'texts' (a list of strings)")
            return self

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.stop()

    app = FastAPI(
        title="slimformer model server",
        version="1",
        description=f"Predictions of the {predictor.task_type} model '{predictor.name}' ({predictor.backend}). "
                    "Errors are JSON objects {\"error\": \"...\"}.",
        lifespan=lifespan,
    )
    app.state.predictor, app.state.batcher, app.state.metrics, app.state.config = predictor, batcher, metrics, config

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = _validation_message(list(exc.errors()))
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - last resort
        log.exception("unhandled error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Predict: labels, entities or perplexity per text")
    async def predict(body: PredictRequest) -> JSONResponse:
        """Classification: label and scores. Token classification: entities with character spans. Causal LM:
        perplexity. Concurrent requests are batched together (see /metadata for the limits)."""
        texts = [body.text] if body.text is not None else list(body.texts or [])
        try:
            predictions = await batcher.submit(texts)
        except ServerBusy as e:
            return JSONResponse({"error": f"server busy: {e}"}, status_code=503, headers={"Retry-After": "1"})
        except Exception as e:
            log.exception("prediction failed")
            return JSONResponse({"error": f"prediction failed ({type(e).__name__}: {str(e)[:200]})"}, status_code=500)
        # A JSONResponse skips re-validating our own output (response_model still documents it).
        return JSONResponse({"model": predictor.name, "task": str(predictor.task_type),
                             "backend": str(predictor.backend), "predictions": predictions})

    @app.get("/health", summary="Liveness: 200 when the model is loaded and the batch worker runs")
    async def health() -> JSONResponse:
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker stopped", "model": predictor.name,
                             "uptime_s": round(time.time() - started, 1), "in_flight": batcher.pending},
                            status_code=200 if ok else 503)

    @app.get("/metadata", summary="The model: task, labels, history of stages, measured quality and cost")
    async def metadata() -> Any:
        record = predictor.record
        meta = {"model": predictor.name, "path": str(predictor.folder.resolve()), "task": str(predictor.task_type),
                "labels": predictor.labels, "backend": str(predictor.backend), "max_length": predictor.max_length,
                "base_model": record.get("base_model"), "history": record.get("history", []),
                "recipe": record.get("recipe"), "quality": record.get("quality"),
                "cost": next((record[k] for k in ("cost", "cost_card", "measurements") if k in record), None),
                "record": _slim_record(record), "serving": config.model_dump(mode="json")}
        return _json_safe(meta)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # Added last, so it runs first: the size check precedes FastAPI's parsing, and the timing covers all.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, metrics=metrics)
    return app


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON (a record may hold a NaN interval): send them as null."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _slim_record(record: dict[str, Any], limit: int = 64_000) -> dict[str, Any]:
    """The record without bulky entries (a vocabulary map can be megabytes): they are named, not sent."""
    out = {}
    for k, v in record.items():
        size = len(json.dumps(v, default=str))
        out[k] = v if size <= limit else f"<omitted: {size} bytes of JSON>"
    return out


def serve(model_dir: str | Path, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Load the model (failing early on a bad folder), warm it up, and serve until interrupted."""
    import uvicorn

    app = create_app(model_dir, config)
    predictor: Predictor = app.state.predictor
    predictor(["warm-up"])  # the first forward pass allocates; keep that out of the first request's latency
    # uvicorn configures logging only once it runs, so say what is being served on stderr directly.
    print(f"serving {predictor.name} ({predictor.task_type}, {predictor.backend}, batching "
          f"{'on' if config.batching else 'off'}) on http://{host}:{port}  (docs: /docs)", file=sys.stderr, flush=True)
    # Keep idle connections longer than pooling clients do (httpx: 5 s, nginx: 60 s): with uvicorn's default of
    # 5 s the server can close a connection just as a client reuses it, and that request fails with a reset.
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False, timeout_keep_alive=KEEP_ALIVE_S)
