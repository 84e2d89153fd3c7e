"""Load test of serve.py on loopback, against the original scripts' way of serving, in one run.

python bench/serve_load.py                                  # the default classifier (shipped bert_lora), 15 s per level
python bench/serve_load.py --checkpoint PATH --seconds 30
python bench/serve_load.py --smoke                          # a few seconds on a tiny model: checks that it runs (CI)

Servers, each started as its own process on a free port, the result cache off (every text is a new one):
- ours: serve.py with its defaults (dynamic batching, length-sorted batches, mixed precision auto);
- ours fp32: the same with --mixed-precision no, to tell batching's share from bf16's;
- original: one model call per request, padded to 128 tokens, fp32, one call at a time (bench/reference.py's
  predict_one behind a FastAPI endpoint; a lock keeps concurrent requests from fighting over the cores).
Clients: 1, 8, 32 and 128 concurrent clients sending one text per request, and 8 clients sending 32 texts per
request, each level for a fixed number of seconds after a short warm-up, then it stops. The texts are validation rows.
Writes results/serve_load.json and results/serve_load.md.
"""
import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weibo_senti import REPO_ROOT, repo_relative  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402

LEVELS = [(1, 1), (8, 1), (32, 1), (128, 1), (8, 32)]  # (concurrent clients, texts per request)
TARGET = (32, 1)  # the level the target is set at: >= 3x the original's texts/s, no errors, p99 no worse


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_original(checkpoint, port):
    """The original scripts' way, as an HTTP endpoint: one request, one padded model call."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from bench.reference import predict_one
    from weibo_senti.predict import SENTIMENTS, Classifier

    classifier = Classifier.load(checkpoint, mixed_precision="no")
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/readyz")
    def readyz():
        return {"ready": True}

    @app.post("/api/sentiment")
    def sentiment(body: dict):
        results = []
        for text in body.get("texts") or [body["text"]]:
            with lock:
                probabilities = predict_one(classifier.model, classifier.tokenizer, text)
            label = int(torch.argmax(probabilities))
            results.append({"label": label, "sentiment": SENTIMENTS[label], "confidence": float(probabilities[label])})
        return {"results": results}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(kind, checkpoint, extra=()):
    port = free_port()
    if kind == "original":
        command = [sys.executable, __file__, "--serve-original", str(port), "--checkpoint", str(checkpoint)]
    else:
        command = [sys.executable, str(REPO_ROOT / "serve.py"), "--port", str(port), "--checkpoint", f"m={checkpoint}",
                   "--cache-size", "0", "--log-level", "warning", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{kind} server exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"{kind} server not ready within 300 s")


def rss_mb(pid):
    """Resident memory of a process now (Linux), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class Connection:
    """A bare HTTP/1.1 keep-alive client on asyncio streams: much less CPU per request than a full client library,
    CPU that on 2 cores the server under test would otherwise lose to its own load generator."""

    def __init__(self, url):
        self.host, self.port = url.split("//")[1].split(":")
        self.reader = self.writer = None

    async def post(self, path, body):
        reused = self.writer is not None
        try:
            return await self._post(path, body)
        except ConnectionError:
            if not reused:
                raise
            return await self._post(path, body)  # the server closed an idle keep-alive connection: once more, anew

    async def _post(self, path, body):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, int(self.port))
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        try:
            self.writer.write(head.encode() + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await self.reader.readexactly(length)
            return status
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.writer.close()
            self.writer = None
            raise ConnectionError("connection lost") from None


async def load(url, texts, clients, per_request, seconds, warmup_seconds):
    latencies, errors, answered = [], {}, [0]
    next_text = [0]
    stop_at = [0.0]
    measuring = [False]

    def take():
        start = next_text[0]
        next_text[0] = (start + per_request) % (len(texts) - per_request)
        return texts[start:start + per_request]

    async def client(connection):
        while time.perf_counter() < stop_at[0]:
            chunk = take()
            body = json.dumps({"text": chunk[0]} if per_request == 1 else {"texts": chunk}, ensure_ascii=False).encode()
            began = time.perf_counter()
            try:
                status = await connection.post("/api/sentiment", body)
                kind = None if status == 200 else str(status)
            except ConnectionError as error:
                kind = type(error).__name__
            if measuring[0]:
                if kind is None:
                    latencies.append(time.perf_counter() - began)
                    answered[0] += per_request
                else:
                    errors[kind] = errors.get(kind, 0) + 1

    connections = [Connection(url) for _ in range(clients)]
    stop_at[0] = time.perf_counter() + warmup_seconds
    await asyncio.gather(*(client(c) for c in connections))
    measuring[0] = True
    began = time.perf_counter()
    stop_at[0] = began + seconds
    await asyncio.gather(*(client(c) for c in connections))
    elapsed = time.perf_counter() - began
    for connection in connections:
        if connection.writer is not None:
            connection.writer.close()

    def quantile(q):
        return statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000 if len(latencies) > 1 else None

    return {
        "clients": clients, "texts_per_request": per_request, "seconds": round(elapsed, 2),
        "requests": len(latencies), "requests_per_s": len(latencies) / elapsed, "texts_per_s": answered[0] / elapsed,
        "p50_ms": quantile(50), "p95_ms": quantile(95), "p99_ms": quantile(99), "errors": errors,
    }


def loaded_rss_mb(checkpoint, copies, shared):
    """In a fresh process: RSS after loading `copies` names of one LoRA checkpoint, as serve.py does (shared: one base,
    each name an adapter of it) or as separate Classifier copies."""
    import transformers

    from weibo_senti.predict import Classifier
    from weibo_senti.serving import load_models

    transformers.logging.set_verbosity_error()

    if shared:
        kept = load_models([(f"m{i}", checkpoint) for i in range(copies)], {"mixed_precision": "no", "backend": "torch"})
    else:
        kept = [Classifier.load(checkpoint, mixed_precision="no") for _ in range(copies)]
    assert kept
    return rss_mb(os.getpid())


def memory_report(checkpoint, copies):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    report = {}
    for label, n, shared in (("one", 1, True), (f"{copies} shared", copies, True), (f"{copies} copies", copies, False)):
        with context.Pool(1) as pool:
            report[label] = pool.apply(loaded_rss_mb, (checkpoint, n, shared))
        print(f"RSS, {label}: {report[label]:.0f} MB", flush=True)
    return report


def validation_texts(data, count):
    from weibo_senti.data import load_labelled_csv, split_train_val

    table, _ = load_labelled_csv(data)
    _, val = split_train_val(table, 0.1, 42)
    return list(val["review"])[:count]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "models" / "classifiers" / "bert_lora")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / "serve_load.json")
    parser.add_argument("--adapters", type=int, default=4, help="names of one LoRA checkpoint, for the memory comparison")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, one short level per server (CI)")
    parser.add_argument("--serve-original", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_original:
        return serve_original(args.checkpoint, args.serve_original)

    levels = LEVELS
    if args.smoke:
        texts = [f"第{i}条微博好开心" for i in range(500)]
        levels, args.seconds, args.warmup_seconds = [(8, 1)], 1.0, 0.5
    else:
        texts = validation_texts(args.data, 20_000)
    report = {
        "command": "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": repo_relative(args.checkpoint),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "servers": {},
        "rss_mb_after_loading": memory_report(args.checkpoint, args.adapters),
    }
    for name, kind, extra in (("ours", "ours", ()), ("ours fp32", "ours", ("--mixed-precision", "no")), ("original", "original", ())):
        process, url = start(kind, args.checkpoint, extra)
        try:
            runs = []
            for clients, per_request in levels:
                result = asyncio.run(load(url, texts, clients, per_request, args.seconds, args.warmup_seconds))
                runs.append(result)
                print(f"{name:>10}  {clients:>3} clients x {per_request:>2} texts: {result['texts_per_s']:7.1f} texts/s  "
                      f"p50 {result['p50_ms'] or 0:7.1f} ms  p99 {result['p99_ms'] or 0:7.1f} ms  errors {result['errors'] or 0}", flush=True)
            report["servers"][name] = {"runs": runs, "rss_mb_after": rss_mb(process.pid)}
        finally:
            process.terminate()
            process.wait(timeout=60)
    ours = {(r["clients"], r["texts_per_request"]): r for r in report["servers"]["ours"]["runs"]}
    original = {(r["clients"], r["texts_per_request"]): r for r in report["servers"]["original"]["runs"]}
    if TARGET in ours:
        a, b = ours[TARGET], original[TARGET]
        report["target"] = {
            "level": f"{TARGET[0]} clients x {TARGET[1]} text",
            "texts_per_s_ratio": a["texts_per_s"] / b["texts_per_s"],
            "p99_ms": [a["p99_ms"], b["p99_ms"]],
            "errors": a["errors"],
            "met": a["texts_per_s"] >= 3 * b["texts_per_s"] and not a["errors"] and a["p99_ms"] <= b["p99_ms"],
        }
    if args.smoke:
        print(json.dumps(report, indent=1))
        return report
    write_json_atomic(args.output, report)
    with atomic_file(args.output.with_suffix(".md")) as handle:
        handle.write(markdown(report))
    print(markdown(report))
    return report


def markdown(report):
    lines = [
        f"`{report['command']}` ({report['machine']}, checkpoint `{report['checkpoint']}`)", "",
        "| server | clients × texts/request | texts/s | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, server in report["servers"].items():
        for r in server["runs"]:
            lines.append(
                f"| {name} | {r['clients']} × {r['texts_per_request']} | {r['texts_per_s']:.1f} | {r['requests_per_s']:.1f} | "
                f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {sum(r['errors'].values())} |"
            )
    if "target" in report:
        t = report["target"]
        lines += ["", f"At {t['level']}: ours / original texts/s = {t['texts_per_s_ratio']:.2f}× (target ≥ 3×), "
                      f"p99 {t['p99_ms'][0]:.0f} ms against {t['p99_ms'][1]:.0f} ms, errors {sum(t['errors'].values())}: "
                      f"target {'met' if t['met'] else 'NOT met'}."]
    memory = report["rss_mb_after_loading"]
    lines += ["", "Memory after loading (RSS, fresh process): " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in memory.items())]
    lines += ["", "Memory after the run (RSS): " + ", ".join(f"{n} {s['rss_mb_after']:.0f} MB" for n, s in report["servers"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
