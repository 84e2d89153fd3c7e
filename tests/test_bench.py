from conftest import run_script
from weibo_senti import REPO_ROOT


def test_benchmark_smoke_mode_runs_and_prints_every_ratio():
    result = run_script(REPO_ROOT / "bench" / "run.py", "--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    for measure in ("training samples/s", "val macro-F1 after equal training", "ours batched vs reference one-by-one",
                    "checkpoint bytes", "peak RSS MB, training", "LoRA merged vs plain base", "adapter vs plain base"):
        assert measure in result.stdout
