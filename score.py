"""Score a whole crawl: files or a database table in, sentiment out, in chunks, incremental and resumable.

python score.py --input posts.parquet --output scored/                       # a Parquet folder of part files
python score.py --input 'crawl/*.jsonl' --output scored.csv --id-column note_id
python score.py --input sqlite:///posts.db --table weibo_note --id-column note_id --text-column content
python score.py --input postgresql+psycopg://user:pw@host/db --table weibo_note --where "create_time > 1793491200"
python score.py --engine spark --input crawl/ --output scored/ --master spark://host:7077
python score.py --engine spark --input postgresql+psycopg://user:pw@host/db --table weibo_note   # JDBC in and out

A database input writes to <table>_sentiment in the same database unless --output / --output-table say otherwise.
Ids already in the output for the same model are skipped, so a rerun scores only new posts; a killed run started again
scores every row exactly once. Rows that cannot be scored go, with the reason, to <table>_bad, <folder>/_bad_rows/ or
<stem>.bad.csv.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weibo_senti import cli, scoring  # noqa: E402
from weibo_senti.predict import Classifier, default_scoring_classifier, fit_to_device, runtime_options  # noqa: E402
from weibo_senti.bettafish import BETTAFISH_DATABASE, bettafish_database_url  # noqa: E402
from weibo_senti.checkpoint import model_name  # noqa: E402

INPUT = ""  # a .csv / .jsonl / .parquet file, a folder or glob of them, a SQLAlchemy database URL, or bettafish: the database BettaFish's settings name (DATABASE_URL or its DB_* variables)
OUTPUT = ""  # a Parquet folder, a .csv file, a SQLAlchemy URL or bettafish (default for a database input: the same database)
TABLE = ""  # the input table, for a database input
ID_COLUMN = "id"  # the column with each post's unique id
TEXT_COLUMN = "content"  # the column with the text to score
WHERE = ""  # an SQL condition on the input table, e.g. "create_time > 1793491200" (MediaCrawler: seconds since 1970)
OUTPUT_TABLE = ""  # the output table, for a database output (default: <TABLE>_sentiment)
CHECKPOINT = ""  # checkpoint folder (default: adapter_tuning's best, or until you have trained one the shipped classifier that serve.py and the analyzer use; models/classifiers/e5_student_4layers scores 2.6x faster, 0.4 points under it on people's labels: docs/scoring.md)
ENGINE = "local"  # local, or spark (mapInPandas; files or a database table through JDBC in, a Parquet folder or a table out)
MASTER = "local[*]"  # Spark master URL, for --engine spark
SPARK_MEMORY = "1g"  # heap of Spark's driver and of each executor (the JVM's; the model lives in the Python workers)
SPARK_JARS = ""  # JDBC driver jars, comma-separated (default: the jar of Debian's libpostgresql-jdbc-java or libxerial-sqlite-jdbc-java)
CHUNK_ROWS = 2000  # rows read, scored and written at a time (one transaction or part file each; on a GPU, when not given: 50000)
BATCH_SIZE = 64  # texts per model call
BATCH_TOKENS = 0  # > 0: a model call takes as many length-sorted texts as fit in this many padded tokens, instead of BATCH_SIZE texts (on a GPU, when not given: 65536)
MIXED_PRECISION = "auto"  # auto (bf16 where the CPU or GPU computes it natively, else fp32), no, bf16 or fp16 (CUDA only)
BACKEND = "auto"  # torch, onnx (ONNX Runtime fp32), onnx-int8, or auto: PyTorch on a GPU or a bf16 CPU, else ONNX Runtime (int8 only if it keeps fp32's labels)


def main():
    cfg = cli.parse_config(globals())
    cfg.input, cfg.output = (bettafish_database_url() if value == BETTAFISH_DATABASE else value for value in (cfg.input, cfg.output))
    if not cfg.input:
        raise scoring.DataError("--input is needed: a file, a folder or glob of files, or a database URL (see --help)")
    if cfg.engine not in ("local", "spark"):
        raise scoring.DataError(f"--engine {cfg.engine}: local or spark")
    cli.check_ranges(cfg, {name: (lambda v: v >= 1, "an integer >= 1") for name in ("chunk_rows", "batch_size")})
    cli.check_ranges(cfg, {"batch_tokens": (lambda v: v >= 0, "an integer >= 0 (0: BATCH_SIZE texts a call)")})
    device_line = fit_to_device(cfg)  # said when the model loads: a refused input stays one line
    checkpoint = cfg.checkpoint or default_scoring_classifier()
    model = model_name(checkpoint)
    began = time.perf_counter()
    if cfg.engine == "spark":
        print(device_line, file=sys.stderr)
        counts = scoring.score_spark(cfg, checkpoint, model)
    else:
        def load_classifier():
            print(device_line, file=sys.stderr)
            classifier = Classifier.load(checkpoint, **runtime_options(cfg))
            print(classifier.describe_runtime(), file=sys.stderr)
            return classifier

        counts = scoring.score(cfg, load_classifier, model)
    print(f"model {model}", file=sys.stderr)
    scoring.print_summary(counts, time.perf_counter() - began)


if __name__ == "__main__":
    cli.main(main)
