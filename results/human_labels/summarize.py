"""Every run of runs.sh, and the shipped classifiers, on the figures of the rule in README.md -> runs.md, runs.json.

python results/human_labels/summarize.py --runs runs

For a run: its best/ as train.py left it (epoch chosen and calibration fitted on one half of weibo2018's 1,500 fixed
validation posts), scored on the other 750, as they are and without tags, and on weibo_senti_100k's validation texts
without tags. A shipped classifier trained on weibo_senti_100k alone is scored on the same 750 posts. A run of an
earlier summary whose folder is gone (an earlier session's) keeps its row as that summary measured it.
"""
import argparse
import json
import re
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from weibo_senti import REPO_ROOT, repo_relative  # noqa: E402
from weibo_senti.calibration import calibration_error, calibration_halves  # noqa: E402
from weibo_senti.checkpoint import atomic_file, read_info, write_json_atomic  # noqa: E402
from weibo_senti.data import HUMAN_DATA, HUMAN_SPLIT_SEED, load_labelled_csv, split_human, strip_emoticons  # noqa: E402

SHIPPED = []  # models/classifiers/ folders trained on weibo_senti_100k alone, measured as candidates (none left: each was replaced)
SHIPPED_AS = {"adapter_b_init": "adapter_tuning", "bert_lora_b_init": "bert_lora",
              "student_c_distil_mixed": "e5_student_4layers"}  # run -> the models/classifiers/ folder its best/ was copied to, by the rule
REPLACED = {"shipped adapter_tuning_distant": "shipped as `adapter_tuning` until 2026-12-04",
            "shipped bert_lora_distant": "shipped as `bert_lora` until 2026-12-05",
            "shipped e5_student_distant": "shipped as `e5_student_4layers` until 2026-12-05"}  # rows of classifiers since replaced
CURVE_RECIPES = {"adapter_a_human": "from e5", "adapter_b_init": "from the distant classifier"}  # the learning curve's two starts


def figures(classifier, texts, labels):
    probabilities = classifier.probabilities(texts)
    said = probabilities.argmax(axis=1)
    recall = [float((said[labels == k] == k).mean()) for k in (0, 1)]
    return {"accuracy": round(float((said == labels).mean()), 4), "recall_negative": round(recall[0], 4),
            "recall_positive": round(recall[1], 4), "recall_gap": round(abs(recall[0] - recall[1]), 4),
            "calibration_error": round(calibration_error(probabilities, labels), 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs")
    args = parser.parse_args()
    from weibo_senti.predict import Classifier

    human, _ = load_labelled_csv(HUMAN_DATA)
    _, held_out = calibration_halves(split_human(human)[1], HUMAN_SPLIT_SEED)
    texts, labels = held_out["review"].tolist(), held_out["label"].to_numpy()
    def portable(text):  # no machine's paths in the results: the runs folder as runs/
        return text.replace(f"{args.runs.resolve()}/", "runs/")

    commands = {}
    if (args.runs / "commands.log").is_file():
        for line in (args.runs / "commands.log").read_text(encoding="utf-8").splitlines():
            name, command = line.split(" ", 1)[1].split(": ", 1)
            commands[name] = portable(command)
    candidates = [(f"shipped {name}", REPO_ROOT / "models" / "classifiers" / name) for name in SHIPPED]
    candidates += [(run.name, run / "best") for run in sorted(args.runs.iterdir()) if (run / "best" / "checkpoint.json").is_file()]
    rows = []
    for name, folder in candidates:
        info = read_info(folder)
        if "calibration" not in info:
            print(f"{name}: not finished (no calibration yet), left out", file=sys.stderr)
            continue
        classifier = Classifier.load(folder)
        metrics = info.get("metrics", {})
        row = {"run": name, "method": info["method"], "checkpoint": repo_relative(folder) if folder.is_relative_to(REPO_ROOT) else f"runs/{folder.parent.name}/best", "epoch": info.get("epoch"),
               "command": commands.get(name, ""), "init_from": portable(info.get("init_from", "")),
               "human_train": info.get("data_rows", {}).get("human_train", 0),
               "distant_share": info.get("run", {}).get("distant_share", "(weibo_senti_100k only)"),
               "held_out": figures(classifier, texts, labels),
               "held_out_no_tags": figures(classifier, [strip_emoticons(t) for t in texts], labels),
               "distant_val_no_tags_accuracy": metrics.get("val_no_emoticons_accuracy"),
               "distant_val_texts": info.get("data_rows", {}).get("val")}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), file=sys.stderr)
    earlier = json.loads((HERE / "runs.json").read_text(encoding="utf-8")) if (HERE / "runs.json").is_file() else []
    measured = {row["run"] for row in rows}
    rows += [{**row, "kept_from_an_earlier_summary": True} for row in earlier
             if row["run"] not in measured]
    write_json_atomic(HERE / "runs.json", rows)
    with atomic_file(HERE / "runs.md") as out:
        out.write("# Every run, on people's labels\n\n`python results/human_labels/summarize.py --runs runs` (the runs of `runs.sh`, each "
                  "command below). Held-out: the 750 of weibo2018's fixed validation posts that chose no epoch and fitted no "
                  "calibration, as they are (the rule's figure) and without tags; calibration applied. Distant: "
                  "weibo_senti_100k's validation texts without tags, as the run's last epoch scored them (2,000 texts for "
                  "runs with `--max-samples 20000`, 7,380 otherwise).\n\n"
                  "| run | method | human posts trained | distant share | epoch | held-out acc | recall neg / pos | calibration error | "
                  "held-out acc, no tags | distant acc, no tags (texts) |\n|---|---|---|---|---|---|---|---|---|---|\n")
        for row in sorted(rows, key=lambda r: -r["held_out"]["accuracy"]):
            h, n = row["held_out"], row["held_out_no_tags"]
            shipped = f" (shipped as `{SHIPPED_AS[row['run']]}`)" if row["run"] in SHIPPED_AS else ""
            shipped = f" ({REPLACED[row['run']]})" if row["run"] in REPLACED else shipped
            name = row["run"] + shipped + (" ¹" if row.get("kept_from_an_earlier_summary") else "")
            distant = f"{row['distant_val_no_tags_accuracy']:.4f} ({row['distant_val_texts']:,})" if row["distant_val_no_tags_accuracy"] else ""
            out.write(f"| {name} | {row['method']} | {row['human_train']:,} | {row['distant_share']} | {row['epoch']} | "
                      f"**{h['accuracy']:.4f}** | {h['recall_negative']:.3f} / {h['recall_positive']:.3f} | {h['calibration_error']:.3f} | "
                      f"{n['accuracy']:.4f} | {distant} |\n")
        curve = {}  # human posts trained -> {recipe: held-out accuracy}, for the runs of one method's two starting points
        for row in rows:
            recipe = CURVE_RECIPES.get(re.sub(r"_\d+$", "", row["run"]))  # adapter_a_human_250 -> adapter_a_human
            if recipe:
                curve.setdefault(row["human_train"], {})[recipe] = row["held_out"]["accuracy"]
        if len(curve) > 1:
            out.write("\n## The learning curve\n\nHeld-out accuracy (the 750 posts above) against the human-labelled posts a run "
                      "trained on (`--human-samples N`, a stratified subset; the adapter, 3 epochs, people's labels only). "
                      "TF-IDF + logistic regression on the same posts: `results/human_labels/tfidf.txt`.\n\n"
                      "| human posts | from e5 | from the distant classifier |\n|---|---|---|\n")
            for count in sorted(curve):
                out.write(f"| {count:,} | {curve[count].get('from e5', '')} | {curve[count].get('from the distant classifier', '')} |\n")
        if any(row.get("kept_from_an_earlier_summary") for row in rows):
            out.write("\n¹ Measured by an earlier summary, whose row this is: an earlier session's run whose folder is gone, or a classifier since replaced.\n")
        out.write("\nCommands:\n\n" + "".join(f"- `{row['run']}`: `{row['command']}`\n" for row in rows if row["command"]))
    print(f"wrote {HERE / 'runs.md'}")


if __name__ == "__main__":
    main()
