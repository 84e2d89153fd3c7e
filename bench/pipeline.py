"""The pipeline's own ceiling: score.py end to end (Parquet in, Parquet out) with the model's forward pass replaced by
one that costs nothing, so what is timed is everything else: reading, checking, tokenizing, batching, writing. No
accelerator can make score.py faster than this figure on the machine it runs on (issue 45).

python bench/pipeline.py                                  # the shipped student's tokenizer and settings, every crawl text
python bench/pipeline.py --rows 5000 --repeats 1          # quicker
python bench/pipeline.py --profile                        # and where the time goes (cProfile, the 25 largest)

The texts are weibo_senti_100k's without their emoticon tags (what a crawler hands over). Each pass scores them into a
fresh Parquet folder in this process, with score.py's flags (--batch-size, --batch-tokens, --chunk-rows as given).
Writes results/pipeline.json and results/pipeline.md.
"""
import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import site
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import score  # noqa: E402  (score.py: its constants are the flags)
from weibo_senti import REPO_ROOT, cli, repo_relative, scoring  # noqa: E402
from weibo_senti.checkpoint import atomic_file, model_name, write_json_atomic  # noqa: E402
from weibo_senti.data import load_labelled_csv, strip_emoticons  # noqa: E402
from weibo_senti.models import cpu_flags  # noqa: E402
from weibo_senti.predict import SCORING_CLASSIFIER, Classifier, fit_to_device, runtime_options  # noqa: E402


def crawl_texts(rows=0):
    """weibo_senti_100k's texts without their tags, those not left empty, as a crawl: DataFrame(id, content)."""
    table, _ = load_labelled_csv(REPO_ROOT / "dataset" / "weibo_senti_100k.csv")
    texts = table["review"].map(strip_emoticons).str.strip()
    texts = texts[texts != ""].reset_index(drop=True)
    if rows:
        texts = texts.iloc[:rows]
    return pd.DataFrame({"id": [f"p{i}" for i in range(len(texts))], "content": texts})


def costs_nothing(classifier):
    """Replace the classifier's forward pass by one that returns zero logits at once, on the model's device."""
    device = classifier.model.device

    def forward(input_ids=None, attention_mask=None, **_):
        return SimpleNamespace(logits=torch.zeros((input_ids.shape[0], 2), device=device))

    classifier.model.forward = forward
    return classifier


def one_pass(argv, input_path, output_dir, checkpoint, zero_cost, profile=None):
    cfg = cli.parse_config(vars(score), [*argv, "--input", str(input_path), "--output", str(output_dir), "--checkpoint", str(checkpoint)])
    device_line = fit_to_device(cfg)
    classifier = Classifier.load(checkpoint, **runtime_options(cfg))
    if zero_cost:
        costs_nothing(classifier)
    began = time.perf_counter()
    if profile:
        profile.enable()
    counts = scoring.score(cfg, lambda: classifier, model_name(checkpoint))
    if profile:
        profile.disable()
    seconds = time.perf_counter() - began
    return {"seconds": round(seconds, 3), "texts_per_s": round(counts["scored"] / seconds, 1), "scored": counts["scored"],
            "device": device_line, "runs_as": classifier.runs_as}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SCORING_CLASSIFIER, help="whose tokenizer, cut and prefix are used")
    parser.add_argument("--rows", type=int, default=0, help="texts to score (0: every one)")
    parser.add_argument("--repeats", type=int, default=2, help="passes; the fastest is reported, each one listed")
    parser.add_argument("--real-model", action="store_true", help="keep the model's forward pass: score.py as it runs")
    parser.add_argument("--profile", action="store_true", help="profile the last pass's scoring and write the 25 functions of most own time")
    parser.add_argument("--results-dir", type=Path, default=REPO_ROOT / "results")
    args, score_argv = parser.parse_known_args()
    crawl = crawl_texts(args.rows)
    results = {"command": "python bench/pipeline.py " + " ".join(sys.argv[1:]), "texts": len(crawl), "score_flags": score_argv,
               "forward_pass": "the model's own" if args.real_model else "replaced by one that costs nothing",
               "checkpoint": repo_relative(args.checkpoint), "cpu": platform.processor() or platform.machine(),
               "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "passes": []}
    with tempfile.TemporaryDirectory() as scratch:
        input_path = Path(scratch) / "crawl.parquet"
        crawl.to_parquet(input_path, index=False)
        profile = cProfile.Profile() if args.profile else None
        for repeat in range(args.repeats):
            last = repeat == args.repeats - 1
            outcome = one_pass(score_argv, input_path, Path(scratch) / f"out{repeat}", args.checkpoint, not args.real_model,
                               profile if last else None)
            results["passes"].append(outcome)
            print(f"pass {repeat + 1}: {outcome['scored']:,} texts in {outcome['seconds']:.2f} s, {outcome['texts_per_s']:,.0f} texts/s", file=sys.stderr)
    results["texts_per_s"] = max(p["texts_per_s"] for p in results["passes"])
    results["device"], results["runs_as"] = results["passes"][-1]["device"], results["passes"][-1]["runs_as"]
    if profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        # no machine's paths in the results: the repository's files relative to it, installed packages under
        # site-packages/, the standard library under python/ (site-packages first: it lies inside the standard library)
        lines = text.getvalue().replace(f"{REPO_ROOT}/", "")
        for path in site.getsitepackages():
            lines = lines.replace(f"{path}/", "site-packages/")
        results["profile_top25_own_time"] = lines.replace(f"{sysconfig.get_paths()['stdlib']}/", "python/").splitlines()
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = "pipeline" if not args.real_model else "pipeline_real_model"
    write_json_atomic(args.results_dir / f"{stem}.json", results)
    with atomic_file(args.results_dir / f"{stem}.md") as out:
        out.write(f"# score.py's pipeline, forward pass {results['forward_pass']}\n\n`{results['command']}`\n\n"
                  f"{results['texts']:,} texts (weibo_senti_100k without tags) from Parquet to Parquet; {results['cores']} cores "
                  f"({', '.join(results['cpu_flags']) or 'no AVX2'}), torch threads {results['torch_threads']}"
                  f"{', GPU ' + results['gpu'] if results['gpu'] else ''}; {results['device']}; tokenizer of {results['checkpoint']}.\n\n"
                  f"| pass | seconds | texts/s |\n|---|---|---|\n")
        for number, outcome in enumerate(results["passes"], start=1):
            out.write(f"| {number} | {outcome['seconds']:.2f} | {outcome['texts_per_s']:,.0f} |\n")
        out.write(f"\nBest: **{results['texts_per_s']:,.0f} texts/s**.\n")
    print(json.dumps({key: results[key] for key in ("texts", "texts_per_s", "device")}, ensure_ascii=False))


if __name__ == "__main__":
    cli.main(main)
