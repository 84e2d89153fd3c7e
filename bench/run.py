"""Benchmark this toolkit against the original scripts' approach (bench/reference.py), same model and data, one run.

python bench/run.py                  # the embedded GPT-2 mini model, dataset/weibo_senti_100k.csv
python bench/run.py --model PATH --data PATH
python bench/run.py --smoke          # a few seconds on a tiny model and synthetic data: checks that it runs (CI)

Each measurement runs in a fresh child process, so that its peak memory (ru_maxrss) is its own; timings are the
median of --repeats runs after a warm-up, with time.perf_counter. Ratios are printed against the targets of the project.
"""
import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weibo_senti import REPO_ROOT, repo_relative  # noqa: E402

ADAPTER_SETTINGS = {"adapter_size": 64}
LORA_SETTINGS = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj"]}


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(model_path):
    import torch

    from weibo_senti.models import load_tokenizer

    torch.manual_seed(0)
    return Path(model_path), load_tokenizer(model_path)


def _loader(variant, tokenizer, texts, labels, batch_size):
    import torch

    from bench.reference import PaddedDataset
    from weibo_senti.data import EncodedTexts, LengthGroupedBatches, make_collate

    generator = torch.Generator().manual_seed(0)
    if variant == "reference":
        return torch.utils.data.DataLoader(PaddedDataset(texts, labels, tokenizer), batch_size=batch_size, shuffle=True, generator=generator)
    if variant.startswith("ours_grouped"):
        dataset = EncodedTexts(texts, labels, tokenizer, 128)
        batches = LengthGroupedBatches([len(ids) for ids in dataset.input_ids], batch_size)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=make_collate(tokenizer.pad_token_id))
    return torch.utils.data.DataLoader(
        EncodedTexts(texts, labels, tokenizer, 128), batch_size=batch_size, shuffle=True, generator=generator,
        collate_fn=make_collate(tokenizer.pad_token_id),
    )


def _precision(variant):
    return "bf16" if variant.endswith("_bf16") else "no"


def train_throughput(variant, model_path, texts, labels, batch_size, steps, repeats):
    """Training samples/s of the adapter model: data loading, forward, backward, clipping, optimizer step."""
    import torch

    from adapter_tuning import adapter
    from weibo_senti.models import autocast

    model_path, tokenizer = _setup(model_path)
    model = adapter.build(model_path, tokenizer, ADAPTER_SETTINGS).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    started_at = time.perf_counter()
    loader = _loader(variant, tokenizer, texts, labels, batch_size)  # ours tokenizes here, once: counted in the timing
    setup_seconds = time.perf_counter() - started_at

    def run_steps(count):
        done = 0
        while done < count:
            for batch in loader:
                with autocast(_precision(variant), "cpu"):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
                done += 1
                if done == count:
                    return

    run_steps(2)  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run_steps(steps)
        rates.append(steps * batch_size / (time.perf_counter() - started))
    return {"samples_per_second": statistics.median(rates), "setup_seconds": setup_seconds, "peak_rss_mb": _peak_rss_mb()}


def train_and_score(variant, model_path, train_texts, train_labels, val_texts, val_labels, batch_size, lr):
    """One pass over the same training rows, then macro-F1 on the same validation rows."""
    import torch
    from sklearn.metrics import f1_score

    from adapter_tuning import adapter
    from weibo_senti.models import autocast
    from weibo_senti.predict import Classifier

    model_path, tokenizer = _setup(model_path)
    model = adapter.build(model_path, tokenizer, ADAPTER_SETTINGS).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for batch in _loader(variant, tokenizer, train_texts, train_labels, batch_size):
        with autocast(_precision(variant), "cpu"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    classifier = Classifier(model, tokenizer, 128, "bench", mixed_precision=_precision(variant))
    predictions = classifier.probabilities(val_texts).argmax(axis=1)
    return {"macro_f1": float(f1_score(val_labels, predictions, average="macro"))}


def predict_throughput(variant, model_path, texts, repeats):
    """Texts/s: ours batched (64, length-sorted; in bf16 with _bf16) or one by one; the reference one by one, padded to 128."""
    from adapter_tuning import adapter
    from bench.reference import predict_one
    from weibo_senti.predict import Classifier

    model_path, tokenizer = _setup(model_path)
    model = adapter.build(model_path, tokenizer, ADAPTER_SETTINGS).eval()
    classifier = Classifier(model, tokenizer, 128, "bench", mixed_precision=_precision(variant))
    if variant.startswith("ours_batched"):
        run = lambda: classifier.probabilities(texts, batch_size=64)  # noqa: E731
    elif variant == "ours_single":
        run = lambda: [classifier.probabilities([t]) for t in texts]  # noqa: E731
    else:
        run = lambda: [predict_one(model, tokenizer, t) for t in texts]  # noqa: E731
    run()  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        rates.append(len(texts) / (time.perf_counter() - started))
    return {"texts_per_second": statistics.median(rates), "peak_rss_mb": _peak_rss_mb()}


def checkpoint_bytes(model_path):
    from adapter_tuning import adapter
    from bench.reference import save_checkpoint

    model_path, tokenizer = _setup(model_path)
    model = adapter.build(model_path, tokenizer, ADAPTER_SETTINGS)
    with tempfile.TemporaryDirectory() as folder:
        adapter.save(model, Path(folder))
        save_checkpoint(model, Path(folder) / "best_model.pth")
        return {"ours": (Path(folder) / adapter.WEIGHTS_FILE).stat().st_size, "reference": (Path(folder) / "best_model.pth").stat().st_size}


def inference_overheads(model_path, texts, repeats):
    """Batched texts/s of the plain base classifier, the adapter model, LoRA unmerged and LoRA merged."""
    import torch

    from adapter_tuning import adapter
    from weibo_senti import lora
    from weibo_senti.models import load_base_classifier
    from weibo_senti.predict import Classifier

    model_path, tokenizer = _setup(model_path)
    lora_model = lora.build(model_path, tokenizer, LORA_SETTINGS)
    for name, parameter in lora_model.named_parameters():  # a trained-looking update, so that merging changes weights
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    models = {
        "base": load_base_classifier(model_path, tokenizer, {})[0],
        "adapter": adapter.build(model_path, tokenizer, ADAPTER_SETTINGS),
        "lora_unmerged": lora_model,
    }
    merged = lora.build(model_path, tokenizer, LORA_SETTINGS)
    merged.load_state_dict(lora_model.state_dict())
    models["lora_merged"] = merged.merge_and_unload()
    rates = {}
    for name, model in models.items():
        classifier = Classifier(model.eval(), tokenizer, 128, name)
        classifier.probabilities(texts[:64])
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.probabilities(texts, batch_size=64)
            runs.append(len(texts) / (time.perf_counter() - started))
        rates[name] = statistics.median(runs)
    return rates


def in_process(function, *args):
    return function(*args)


def in_child(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def smoke_inputs(folder):
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import tiny

    return tiny.make_gpt2(folder / "gpt2"), tiny.write_csv(folder / "data.csv", tiny.synthetic_rows(300))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "models" / "gpt2-chinese-mini"), help="GPT-2 save_pretrained folder")
    parser.add_argument("--data", default=str(REPO_ROOT / "dataset" / "weibo_senti_100k.csv"), help="label,review CSV")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data, a few steps: checks that the benchmark runs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=30, help="timed training steps per repeat")
    parser.add_argument("--score-rows", type=int, default=4000, help="training rows for the equal-training F1 check")
    parser.add_argument("--predict-texts", type=int, default=300, help="validation texts for the prediction timings")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench.json")
    args = parser.parse_args()

    from weibo_senti.data import load_labelled_csv, split_train_val

    scratch = tempfile.TemporaryDirectory()
    if args.smoke:
        args.model, args.data = smoke_inputs(Path(scratch.name))
        args.train_steps, args.score_rows, args.predict_texts, args.repeats = 3, 64, 20, 1
    if not (args.model and args.data):
        parser.error("--model and --data are needed (or --smoke)")
    table, _ = load_labelled_csv(Path(args.data))
    train, val = split_train_val(table, 0.1, seed=42)
    train_texts, train_labels = train["review"].tolist(), train["label"].tolist()
    val_texts, val_labels = val["review"].tolist(), val["label"].tolist()
    timed_rows = max(args.batch_size * (args.train_steps + 2), args.batch_size * 200)  # >= 4 windows of length grouping
    predict_texts = val_texts[: args.predict_texts]

    results = {"model": repo_relative(args.model), "data": repo_relative(args.data), "batch_size": args.batch_size}
    run = in_process if args.smoke else in_child
    for variant in ("ours", "ours_grouped", "ours_grouped_bf16", "reference"):
        print(f"training throughput: {variant} ...", flush=True)
        results[f"train_{variant}"] = run(
            train_throughput, variant, args.model, train_texts[:timed_rows], train_labels[:timed_rows], args.batch_size, args.train_steps, args.repeats
        )
        print(f"equal training, then validation macro-F1: {variant} ...", flush=True)
        results[f"score_{variant}"] = run(
            train_and_score, variant, args.model, train_texts[: args.score_rows], train_labels[: args.score_rows],
            val_texts[:1000], val_labels[:1000], args.batch_size, 1e-3,
        )
    for variant in ("ours_batched", "ours_batched_bf16", "ours_single", "reference_single"):
        print(f"prediction: {variant} ...", flush=True)
        results[f"predict_{variant}"] = run(predict_throughput, variant, args.model, predict_texts, args.repeats)
    results["checkpoint_bytes"] = run(checkpoint_bytes, args.model)
    print("inference overheads: base, adapter, LoRA unmerged, LoRA merged ...", flush=True)
    results["inference_texts_per_second"] = run(inference_overheads, args.model, predict_texts, args.repeats)

    report = ratios(results)
    print(report)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")
        args.out.with_suffix(".md").write_text(f"```\n{' '.join(sys.argv)}\n\n{report}\n```\n", encoding="utf-8")
    scratch.cleanup()


def ratios(r):
    speed = r["inference_texts_per_second"]
    rows = [
        ("training samples/s", r["train_ours"]["samples_per_second"], r["train_reference"]["samples_per_second"], ""),
        ("training samples/s, length-grouped batches", r["train_ours_grouped"]["samples_per_second"], r["train_reference"]["samples_per_second"], ""),
        ("training samples/s, length-grouped + bf16 (the defaults)", r["train_ours_grouped_bf16"]["samples_per_second"], r["train_reference"]["samples_per_second"], ">= 4x"),
        ("val macro-F1 after equal training", r["score_ours"]["macro_f1"], r["score_reference"]["macro_f1"], ">= reference"),
        ("val macro-F1 after equal training, length-grouped", r["score_ours_grouped"]["macro_f1"], r["score_reference"]["macro_f1"], ">= reference"),
        ("val macro-F1 after equal training, length-grouped + bf16", r["score_ours_grouped_bf16"]["macro_f1"], r["score_reference"]["macro_f1"], ">= reference"),
        ("prediction texts/s: ours batched vs reference one-by-one", r["predict_ours_batched"]["texts_per_second"], r["predict_reference_single"]["texts_per_second"], ""),
        ("prediction texts/s: ours batched bf16 (the default)", r["predict_ours_batched_bf16"]["texts_per_second"], r["predict_reference_single"]["texts_per_second"], ">= 5x"),
        ("prediction texts/s: ours one-by-one vs reference one-by-one", r["predict_ours_single"]["texts_per_second"], r["predict_reference_single"]["texts_per_second"], ""),
        ("checkpoint bytes", r["checkpoint_bytes"]["ours"], r["checkpoint_bytes"]["reference"], "<= 1/50"),
        ("peak RSS MB, training", r["train_ours"]["peak_rss_mb"], r["train_reference"]["peak_rss_mb"], ""),
        ("peak RSS MB, prediction", r["predict_ours_batched"]["peak_rss_mb"], r["predict_reference_single"]["peak_rss_mb"], ""),
        ("batched texts/s: LoRA merged vs plain base", speed["lora_merged"], speed["base"], ">= 0.95x"),
        ("batched texts/s: LoRA unmerged vs plain base", speed["lora_unmerged"], speed["base"], "reported"),
        ("batched texts/s: adapter vs plain base", speed["adapter"], speed["base"], "reported"),
    ]
    lines = [f"{'measure':62} {'ours':>12} {'reference':>12} {'ratio':>8}  target"]
    for name, ours, reference, target in rows:
        lines.append(f"{name:62} {ours:>12,.4g} {reference:>12,.4g} {ours / reference:>8.3f}  {target}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
