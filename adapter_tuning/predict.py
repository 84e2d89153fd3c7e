"""Score Weibo posts with the adapter-tuned GPT-2: interactive console, or --text / --file / stdin in batches."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from weibo_senti import cli, predict  # noqa: E402

if __name__ == "__main__":
    cli.main(lambda: predict.main(Path(__file__).resolve().parent / "output" / "best", method="adapter_tuning"))
