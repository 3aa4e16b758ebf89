"""Cost: one card per model, measured on this machine.

Latency is wall time of one forward pass at a fixed batch, sequence length and thread count, after
warm-up, over at least 30 timed runs (p50/p95 reported). Every card records the CPU model and the flags
that decide which kernels are fast here (AVX-512, VNNI, AMX), so numbers from different machines are
never compared by accident.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from slimformer.models import count_parameters, library_versions

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def hardware() -> dict[str, Any]:
    """CPU model, relevant instruction-set flags, core counts and library versions."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def supports_fast_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    flags = set(hardware()["cpu_flags"])
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux from ``VmHWM``, the high-water mark of the process's
    own address space: ``getrusage``'s ``ru_maxrss`` survives ``execve``, so a child started by a big process
    (a search holding a teacher and its students, 2.4 GB) reported the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; no exec issue elsewhere


def dummy_batch(tokenizer, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of ordinary (non-special, non-padding) token ids: every position is real work."""
    g = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    low = max(special) + 1 if special and max(special) < vocab // 2 else 1000 if vocab > 2000 else 1
    ids = torch.randint(low, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # Only models whose tokenizer produces segment ids get them (a decoder would add an unused embedding).
    if "token_type_ids" in (getattr(tokenizer, "model_input_names", None) or ["token_type_ids"]):
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


def time_runs(fn: Callable[[], Any], warmup: int = 5, runs: int = 30, min_seconds: float = 0.0
              ) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``fn`` after ``warmup`` calls (more runs until
    ``min_seconds`` have passed)."""
    # CUDA kernels run asynchronously: wait for them before reading the clock, or only the launch is timed.
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every millisecond)."""

    def __enter__(self) -> PeakRSS:
        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def count_flops(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int | None:
    """FLOPs of one forward pass, counted by torch.utils.flop_counter (matmuls and convolutions).

    The counter has no formula for the CPU's fused SDPA kernel, so attention is counted with the eager
    implementation (the same matmuls, spelled out) and switched back afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(model, "set_attn_implementation")
    try:
        if switch:
            model.set_attn_implementation("eager")
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(**inputs)
        return int(counter.get_total_flops())
    except Exception:  # quantized kernels have no FLOP formula; report unknown rather than wrong
        return None
    finally:
        if switch:
            model.set_attn_implementation(previous)


def folder_size(folder: str | os.PathLike, patterns: tuple[str, ...] = ("*.safetensors", "*.onnx", "*.onnx.data",
                                                                      "*.pt2")) -> int:
    """Bytes of the weight files in a model folder (tokenizer and json files are not the model)."""
    folder = Path(folder)
    seen = set()
    total = 0
    for pat in patterns:
        for f in folder.glob(pat):
            if f not in seen:
                seen.add(f)
                total += f.stat().st_size
    return total


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes the weights take when saved (tensors shared by tying counted once)."""
    seen, total = set(), 0
    for t in list(model.state_dict().values()):
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def measure_runner(
    run: Callable[[dict[str, Any]], Any],
    inputs: dict[str, Any],
    *,
    batch: int,
    seq: int,
    threads: int,
    warmup: int = 5,
    runs: int = 30,
    min_seconds: float = 0.0,
) -> dict[str, Any]:
    """Latency, throughput and peak memory of ``run(inputs)`` (any backend).

    Memory is sampled in a separate, shorter pass: the sampling thread would otherwise steal time from
    the runs being timed.
    """
    times = time_runs(lambda: run(inputs), warmup=warmup, runs=runs, min_seconds=min_seconds)
    with PeakRSS() as mem:
        for _ in range(3):
            run(inputs)
    ms = np.array(times) * 1000
    return {
        "batch": batch, "seq": seq, "threads": threads, "runs": len(times), "warmup": warmup,
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p95": float(np.percentile(ms, 95)),
        "latency_ms_mean": float(ms.mean()),
        "latency_ms_std": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
        "throughput_per_s": float(batch / (statistics.median(times))),
        "peak_rss_mb": mem.peak / 2**20,
        "peak_rss_increase_mb": (mem.peak - mem.start) / 2**20,
    }


def measure_model(
    model: torch.nn.Module,
    tokenizer,
    *,
    batch: int = 1,
    seq: int = 128,
    threads: int | None = None,
    warmup: int = 5,
    runs: int = 30,
    folder: str | os.PathLike | None = None,
    flops: bool = True,
) -> dict[str, Any]:
    """The cost card of a PyTorch model: size, parameters, FLOPs, latency, throughput, memory, hardware."""
    threads = threads or torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        device = next(model.parameters()).device
        inputs = dummy_batch(tokenizer, batch, seq)
        import inspect

        accepted = set(inspect.signature(model.forward).parameters)
        inputs = {k: v.to(device) for k, v in inputs.items() if k in accepted}

        @torch.inference_mode()
        def run(x: dict[str, Any]) -> Any:
            return model(**x)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timing = measure_runner(run, inputs, batch=batch, seq=seq, threads=threads, warmup=warmup, runs=runs)
        card: dict[str, Any] = {"backend": "pytorch", "device": str(device), **count_parameters(model)}
        if device.type == "cuda":  # resident memory is the host's; the model's own memory is on the GPU
            card["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        card["sparsity"] = 1 - card["nonzero_parameters"] / max(1, card["parameters"])
        card["size_bytes"] = folder_size(folder) if folder else state_dict_bytes(model)
        card["size_mb"] = card["size_bytes"] / 1e6
        card["flops"] = count_flops(model, inputs) if flops else None
        card.update(timing)
        card["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        card["hardware"] = hardware()
        if card["sparsity"] > 0.01:
            card["note"] = ("weights are sparse but stored and multiplied densely: dense kernels do not get "
                            "faster or smaller from zeros")
        return card
    finally:
        torch.set_num_threads(previous)
