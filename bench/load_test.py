"""Load test of ``slimformer serve``: throughput and latency with micro-batching on, then off.

Starts the server in a subprocess on 127.0.0.1 (a free port), drives it with N concurrent HTTP clients for T
seconds (after a short untimed warm-up), and prints requests/s, p50/p99 latency, the error count and the mean
texts per forward pass (read from the server's /metrics). Everything is bounded: each request has a timeout,
each phase a deadline, and the server is always stopped, so the script ends by itself.

    python bench/load_test.py runs/sst2-ft                      # 50 clients, 60 s per mode
    python bench/load_test.py runs/sst2-ft --clients 8 --seconds 5

Client and server share this machine's cores; the numbers compare the two modes side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

# SST-2-like sentences of varied length (the server sees realistic, not constant, inputs).
TEXTS = [
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "allows us to hope that nolan is poised to embark a major career as a commercial yet inventive filmmaker .",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "it 's slow -- very , very slow .",
    "although laced with humor and a few fanciful touches , the film is a refreshingly serious look at young women .",
    "a sometimes tedious film .",
    "or doing last year 's taxes with your ex-wife .",
    "you do n't have to know about music to appreciate the film 's easygoing blend of comedy and romance .",
    "in exactly 89 minutes , most of which passed as slowly as if i 'd been sitting naked on an igloo , formula 51 "
    "sank from quirky to jerky to utter turkey .",
    "the mesmerizing performances of the leads keep the film grounded and keep the audience riveted .",
    "it takes a strange kind of laziness to waste the talents of robert forster , anne meara , eugene levy , and "
    "reginald veljohnson all in the same movie .",
    "... the film suffers from a lack of humor ( something needed to balance out the violence ) ...",
    "we root for ( clara and paul ) , even like them , though perhaps it 's an emotion closer to pity .",
    "even horror fans will most likely not find what they 're seeking with trouble every day ; the movie lacks "
    "both thrills and humor .",
    "a gorgeous , high-spirited musical from india that exquisitely blends music , dance , song , and high drama .",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, batching: bool, log_file) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "slimformer.cli", "serve", str(args.model), "--host", "127.0.0.1", "--port",
           str(port), "--log-level", "warning", "--max-batch", str(args.max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--backend", args.backend, "--batching" if batching else "--no-batching"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}:\n{Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout:.0f} s:\n{Path(log_path).read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def drive(url: str, clients: int, seconds: float, timeout: float) -> dict:
    """N clients, each sending one request after another until the deadline; latency of every answer."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    examples: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def one_client(k: int) -> None:
            i = k
            while time.perf_counter() < deadline:
                text = TEXTS[i % len(TEXTS)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", json={"text": text})
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    if len(examples) < 3:
                        examples.append(f"{type(e).__name__} after {time.perf_counter() - t0:.2f} s at "
                                        f"t={t0 - start:.1f} s: {e!r}")

        tasks = [asyncio.create_task(one_client(k)) for k in range(clients)]
        # Bounded even if the server hangs: requests time out, and so does the whole phase.
        done, pending = await asyncio.wait(tasks, timeout=seconds + timeout + 5)
        for t in pending:
            t.cancel()
            errors["phase-timeout"] = errors.get("phase-timeout", 0) + 1
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics", timeout=10)).text
    ms = np.array(latencies) * 1000
    return {
        # Over the elapsed time: the answers still in flight at the deadline are counted, so is their time.
        "requests": len(latencies), "seconds": round(elapsed, 1), "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
        "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
        "errors": sum(errors.values()), "error_kinds": errors, "error_examples": examples,
        "mean_batch": _mean_batch(metrics),
    }


def _mean_batch(metrics: str) -> float:
    values = {}
    for line in metrics.splitlines():
        if line.startswith(("slimformer_batch_size_sum", "slimformer_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("slimformer_batch_size_sum", 0) / max(1.0, values.get("slimformer_batch_size_count", 0))


def run_mode(args: argparse.Namespace, batching: bool) -> dict:
    with tempfile.NamedTemporaryFile("w+", prefix="slimformer-serve-", suffix=".log", delete=False) as log:
        proc, url = start_server(args, batching, log)
        try:
            wait_ready(proc, url, args.startup_timeout, log.name)
            if args.warmup > 0:
                asyncio.run(drive(url, args.clients, args.warmup, args.request_timeout))
            result = asyncio.run(drive(url, args.clients, args.seconds, args.request_timeout))
        finally:
            stop_server(proc)
        log.seek(0)
        server_log = log.read()
    os.unlink(log.name)
    if result["errors"]:  # what the server said may explain the failed requests
        result["server_log_tail"] = server_log[-1500:]
    return {"batching": batching, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="saved slimformer model folder")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured seconds per mode (default 60)")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed seconds of load before measuring")
    p.add_argument("--max-batch", type=int, default=32, help="server --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms")
    p.add_argument("--threads", type=int, default=None, help="server --threads")
    p.add_argument("--backend", default="auto", help="server --backend: auto | torch | onnx")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for the server to load")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args()
    if not (1 <= args.clients <= 1000 and 0 < args.seconds <= 600):
        raise SystemExit("--clients must be 1..1000 and --seconds 0..600 (the test must stay bounded)")
    if not args.model.is_dir():
        raise SystemExit(f"model folder {args.model} does not exist")

    print(f"load test: {args.model}, {args.clients} clients, {args.seconds:g} s per mode (+{args.warmup:g} s warm-up), "
          f"max-batch {args.max_batch}, max-wait {args.max_wait_ms:g} ms, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for batching in (True, False):
        r = run_mode(args, batching)
        results.append(r)
        print(f"  batching {'on ' if batching else 'off'}: {r['requests_per_s']:8.1f} req/s   "
              f"p50 {r['p50_ms']:8.1f} ms   p99 {r['p99_ms']:8.1f} ms   errors {r['errors']:4d}   "
              f"mean batch {r['mean_batch']:5.1f}   ({r['requests']} requests)"
              + (f"   {r['error_kinds']}" if r["errors"] else ""), flush=True)
        for example in r.get("error_examples", []):
            print(f"    e.g. {example}")
        if r.get("server_log_tail", "").strip():
            print("    server log (tail):\n      " + r["server_log_tail"].strip().replace("\n", "\n      "))
    on, off = results
    gain = {"throughput_x": on["requests_per_s"] / max(off["requests_per_s"], 1e-9),
            "p50_x": off["p50_ms"] / max(on["p50_ms"], 1e-9), "p99_x": off["p99_ms"] / max(on["p99_ms"], 1e-9)}
    print(f"  gain from batching: throughput x{gain['throughput_x']:.2f}, p50 latency x{gain['p50_x']:.2f} lower, "
          f"p99 latency x{gain['p99_x']:.2f} lower")
    if args.json:
        print(json.dumps({"results": results, "gain": gain}, indent=2))


if __name__ == "__main__":
    main()
