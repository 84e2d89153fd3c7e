"""Throughput and peak memory of score.py, --engine local and --engine spark (local[2]), on the dataset's rows and on the
same rows repeated 4 times: peak memory must not grow with the input.

python bench/score_scale.py                                        # the shipped lora classifier (mini GPT-2: quick)
python bench/score_scale.py --checkpoint models/classifiers/bert_lora --rows 5000 --repeats 1 --engines local
python bench/score_scale.py --smoke                                # seconds, on a tiny input: checks that it runs (CI)

Each run is `score.py` in a fresh process writing a fresh Parquet folder; its peak memory is the largest sum of the
resident memory of its whole process tree (for Spark: the JVM and its Python workers), sampled every 0.1 s; the peaks of
its Python processes and of the JVM are reported too (each its own largest sum, so the two need not add up to the total).
Writes results/score_scale.json and results/score_scale.md.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve_load import rss_mb  # noqa: E402
from weibo_senti import REPO_ROOT, repo_relative  # noqa: E402
from weibo_senti.checkpoint import atomic_file, write_json_atomic  # noqa: E402
from weibo_senti.checkpoint import model_name  # noqa: E402


def tree_rss_mb(pid):
    """Resident memory of a process and all its descendants (Linux /proc), in MB: {"total", "java", "python"}."""
    children = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(
            (int(status.parent.name), fields["Name"].strip(), int(fields.get("VmRSS", "0 kB").split()[0]) / 1024))
    try:
        own = rss_mb(pid) or 0
    except OSError:  # the process ended meanwhile
        own = 0
    parts, stack = {"total": own, "java": 0.0, "python": own}, [pid]
    while stack:
        for child, name, rss in children.get(stack.pop(), []):
            parts["total"] += rss
            kind = "java" if name == "java" else "python" if name.startswith("python") else None
            if kind:
                parts[kind] += rss
            stack.append(child)
    return parts


def run(command):
    """Runs a command to its end: (seconds, the peak of each part of its memory, its summary line). peak["by_tenth"]:
    the peak total in each tenth of the run, to tell memory that levels off from memory that keeps growing."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    began, peak, samples = time.perf_counter(), {}, []
    while process.poll() is None:
        parts = tree_rss_mb(process.pid)
        for part, mb in parts.items():
            peak[part] = max(peak.get(part, 0.0), mb)
        samples.append((time.perf_counter() - began, parts["total"]))
        time.sleep(0.1)
    seconds = time.perf_counter() - began
    peak["by_tenth"] = [round(max([mb for at, mb in samples if int(10 * at / seconds) == tenth] or [0])) for tenth in range(10)]
    stderr = process.stderr.read()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    summary = [line for line in stderr.splitlines() if line.startswith("read ")][-1]
    return seconds, peak, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=REPO_ROOT / "models" / "classifiers" / "lora")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    parser.add_argument("--rows", type=int, default=0, help="use the first N rows (0: all)")
    parser.add_argument("--repeats", type=int, default=4, help="the larger input: the rows this many times, with new ids")
    parser.add_argument("--engines", default="local,spark")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "results" / "score_scale.json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    import pandas as pd

    table = pd.read_csv(args.data, usecols=["review"]).rename(columns={"review": "content"})
    if args.smoke:
        args.rows, args.repeats = 300, 2
    if args.rows:
        table = table.iloc[:args.rows]
    report = {
        "command": "python bench/score_scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "checkpoint": repo_relative(args.checkpoint), "model": model_name(args.checkpoint), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {}
        for times in sorted({1, args.repeats}):
            folder = Path(tmp) / f"input_x{times}"
            folder.mkdir()
            for copy in range(times):  # one part file per copy, like a crawl's daily files
                part = table.assign(id=range(copy * len(table) + 1, (copy + 1) * len(table) + 1))
                part[["id", "content"]].to_parquet(folder / f"part-{copy:03d}.parquet")
            inputs[times] = (folder, len(table) * times)
        for engine in args.engines.split(","):
            for times, (folder, rows) in inputs.items():
                output = Path(tmp) / f"out_{engine}_x{times}"
                command = [sys.executable, str(REPO_ROOT / "score.py"), "--input", str(folder), "--output", str(output),
                           "--checkpoint", str(args.checkpoint), "--engine", engine, "--master", "local[2]"]
                seconds, peak, summary = run(command)
                entry = {"engine": engine, "rows": rows, "seconds": round(seconds, 1), "texts_per_s": rows / seconds,
                         "peak_rss_mb": round(peak["total"]), "peak_python_rss_mb": round(peak["python"]),
                         "peak_java_rss_mb": round(peak["java"]), "peak_rss_mb_by_tenth": peak["by_tenth"], "summary": summary}
                report["runs"].append(entry)
                print(f"{engine:>6} {rows:>9,} rows: {entry['texts_per_s']:7.1f} texts/s (whole command, start-up included), "
                      f"peak RSS {peak['total']:,.0f} MB (Python {peak['python']:,.0f}, JVM {peak['java']:,.0f}; "
                      f"by tenth of the run: {peak['by_tenth']})", flush=True)
    for engine in args.engines.split(","):
        runs = [r for r in report["runs"] if r["engine"] == engine]
        if len(runs) == 2:
            report[f"{engine}_peak_memory_ratio"] = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    if args.smoke:
        return report
    write_json_atomic(args.output, report)
    lines = [f"`{report['command']}` ({report['machine']}, checkpoint `{report['checkpoint']}`, model `{report['model']}`)", "",
             "| engine | rows | seconds | texts/s | peak RSS MB | of which Python | of which JVM |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['rows']:,} | {r['seconds']} | {r['texts_per_s']:.1f} | {r['peak_rss_mb']:,} | "
              f"{r['peak_python_rss_mb']:,} | {r['peak_java_rss_mb']:,} |" for r in report["runs"]]
    lines += ["", "Peak RSS MB in each tenth of the run:"] + [
        f"- {r['engine']}, {r['rows']:,} rows: {', '.join(map(str, r['peak_rss_mb_by_tenth']))}" for r in report["runs"]]
    lines += [""] + [f"{engine}: peak memory at {args.repeats}x the rows / at 1x = {report[f'{engine}_peak_memory_ratio']:.2f}"
                     for engine in args.engines.split(",") if f"{engine}_peak_memory_ratio" in report]
    with atomic_file(args.output.with_suffix(".md")) as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
