"""Does int8 keep its labels on a CPU without AVX-512 or VNNI? ONNX Runtime's int8 export of a checkpoint run on the
kernels such a CPU gets, on a CPU that has more, by emulation: under valgrind, whose emulated CPU reports AVX2 and no
AVX-512, VNNI or bf16, so ONNX Runtime, oneDNN and PyTorch pick their AVX2 kernels, computing what they compute there.

python studies/int8_avx2_kernels/int8_avx2_kernels.py                                          # the 4-layer student, 500 texts
python studies/int8_avx2_kernels/int8_avx2_kernels.py --checkpoint models/classifiers/adapter_tuning --texts 100

The texts are the export's check texts (validation texts without tags, after the probe texts), where export.json
measures int8's fidelity on the CPU that exports. int8 alone (without the second look) is run under valgrind, split
over SHARDS processes; the same export, PyTorch fp32 and the second look's margin are run here natively. Reported: int8
on the AVX2 kernels against int8 on this CPU's kernels (how far the kernels differ), and against PyTorch fp32, alone and
with the second look, whose fp32 scores the texts within the margin of 0.5 (ONNX Runtime fp32 gives PyTorch fp32's
probabilities within 1e-5; under valgrind it is too slow to run on them: 44 s a text against int8's 4). Only labels and
probabilities count here: valgrind runs int8 about 800x and fp32 7,000x slower than this CPU, so no speed is measured. Writes OUT.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from weibo_senti import REPO_ROOT, cli, repo_relative  # noqa: E402
from weibo_senti.checkpoint import write_json_atomic  # noqa: E402

CHECKPOINT = Path("models/classifiers/e5_student_4layers")  # a trained checkpoint folder
TEXTS = 500  # the export's check texts used, from the first (at most onnx_backend.CHECK_TEXTS)
SHARDS = os.cpu_count() or 1  # valgrind processes, one text shard each (valgrind runs a process on one core)
OUT = Path("studies/int8_avx2_kernels/results.json")  # one entry per checkpoint

# what each valgrind process runs: int8 alone on its shard, and the CPU kind it sees
EMULATED = """
import json, sys
import numpy as np
from weibo_senti.models import cpu_kind
from weibo_senti.onnx_backend import OnnxModel
from weibo_senti.predict import Classifier
checkpoint, int8_path, texts_path, out = sys.argv[1:]
classifier = Classifier.load(checkpoint, mixed_precision="no")
texts = json.loads(open(texts_path, encoding="utf-8").read())
np.savez(out, probabilities=classifier.probabilities_with(OnnxModel(int8_path), texts), cpu_kind=cpu_kind())
"""


def emulated_int8(checkpoint, int8_path, texts, shards, workdir):
    """int8-alone probabilities of `texts` under valgrind, and the CPU kind the emulated processes saw."""
    processes, outputs = [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}  # one thread: valgrind serializes threads anyway
    for index, shard in enumerate(np.array_split(np.arange(len(texts)), shards)):
        texts_path, out = workdir / f"texts{index}.json", workdir / f"int8_{index}.npz"
        texts_path.write_text(json.dumps([texts[i] for i in shard], ensure_ascii=False), encoding="utf-8")
        command = ["valgrind", "-q", "--tool=none", sys.executable, "-c", EMULATED, str(checkpoint), str(int8_path), str(texts_path), str(out)]
        processes.append(subprocess.Popen(command, env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True))
        outputs.append(out)
    for process in processes:
        _, errors = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"a valgrind process failed ({process.returncode}):\n{errors[-3000:]}")
    parts = [np.load(out) for out in outputs]
    return np.concatenate([part["probabilities"] for part in parts]), sorted({str(part["cpu_kind"]) for part in parts})


def main():
    from weibo_senti.onnx_backend import INT8_FILE, OnnxModel, ensure_exported, export_texts, fidelity
    from weibo_senti.predict import Classifier
    from bench.inference import cpu

    cfg = cli.parse_config(globals())
    classifier = Classifier.load(cfg.checkpoint, mixed_precision="no")
    folder, record = ensure_exported(classifier, cfg.checkpoint)
    texts = export_texts()[2][: cfg.texts]
    if not texts:
        raise SystemExit("no check texts: the data set (dataset/weibo_senti_100k.csv or $WEIBO_SENTI_DATA) is needed")
    fp32 = classifier.probabilities_with(None, texts, precision="no")
    here = classifier.probabilities_with(OnnxModel(folder / INT8_FILE), texts)
    print(f"{len(texts)} texts, int8 alone under valgrind in {cfg.shards} processes (about 4 s a text for 4 e5 layers, 12 s for 12)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as workdir:
        emulated, kinds = emulated_int8(cfg.checkpoint, folder / INT8_FILE, texts, cfg.shards, Path(workdir))
    if kinds != ["avx2"]:
        raise SystemExit(f"the emulated CPU was {kinds}, not avx2: this valgrind passes AVX-512 or VNNI through")
    margin = record["int8"]["recheck_margin"]

    def within_margin(int8):  # the texts the second look scores again in fp32
        return np.abs(int8[:, 1] - 0.5) < margin

    def with_second_look(int8):
        return np.where(within_margin(int8)[:, None], fp32, int8)

    entry = {
        "checkpoint": repo_relative(cfg.checkpoint),
        "command": "python studies/int8_avx2_kernels/int8_avx2_kernels.py " + " ".join(sys.argv[1:]),
        "machine": cpu(),
        "emulated": f"{subprocess.run(['valgrind', '--version'], capture_output=True, text=True).stdout.strip()} --tool=none: its CPU reports AVX2, no AVX-512, VNNI or bf16 (cpu_kind() there: avx2)",
        "texts": len(texts),
        "recheck_margin": margin,
        "texts_within_margin_on_avx2": int(within_margin(emulated).sum()),
        "int8_alone_avx2_against_int8_here": fidelity(here, emulated),
        "int8_alone_avx2_against_pytorch_fp32": fidelity(fp32, emulated),
        "int8_with_second_look_avx2_against_pytorch_fp32": fidelity(fp32, with_second_look(emulated)),
        "int8_with_second_look_here_against_pytorch_fp32": fidelity(fp32, with_second_look(here)),
    }
    print(json.dumps(entry, indent=2, ensure_ascii=False))
    results = json.loads(cfg.out.read_text(encoding="utf-8")) if cfg.out.is_file() else {}
    results[entry["checkpoint"]] = entry
    write_json_atomic(cfg.out, results)


if __name__ == "__main__":
    main()
