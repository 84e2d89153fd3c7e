"""score.py against real files, a real SQLite file, real PostgreSQL and MariaDB servers on loopback, and Spark in local[2]."""
import glob
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

import tiny
from conftest import run_script
from weibo_senti import REPO_ROOT
from weibo_senti.predict import Classifier
from weibo_senti.checkpoint import model_name

SCORE = REPO_ROOT / "score.py"
FP32 = ["--mixed-precision", "no", "--backend", "torch"]


def posts(count, start=1, seed=0):
    """A crawl-like table: note_id, content, with a NULL and a blank text among them."""
    rows = tiny.synthetic_rows(count, seed=seed)
    table = pd.DataFrame({"note_id": range(start, start + count), "content": [text for _, text in rows]})
    if count > 10:
        table.loc[3, "content"] = None
        table.loc[7, "content"] = "   "
    return table


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained("adapter_tuning")[0] / "best"


def score(*args, expect=0):
    result = run_script(SCORE, *map(str, args), *FP32)
    assert result.returncode == expect, result.stderr[-3000:]
    return result


def summary(result):
    line = [line for line in result.stderr.splitlines() if line.startswith("read ")][-1]
    numbers = [int(word.rstrip(",").replace(",", "")) for word in line.split() if word.rstrip(",").replace(",", "").isdigit()]
    return dict(zip(("read", "scored", "skipped", "bad"), numbers))


def expected(checkpoint, table):
    good = table[table["content"].notna() & (table["content"].str.strip() != "")]
    results = Classifier.load(checkpoint).predict(list(good["content"]))
    return {int(i): r for i, r in zip(good["note_id"], results)}


def check_results(frame, want, model):
    assert sorted(frame["id"].astype(int)) == sorted(want)  # every scorable row exactly once
    assert set(frame["model"]) == {model}
    for row in frame.itertuples():
        assert row.label == want[int(row.id)]["label"]
        assert abs(row.prob_positive - want[int(row.id)]["prob_positive"]) < 1e-5


def test_parquet_folder_from_csv_is_incremental_and_keeps_bad_rows_aside(checkpoint, tmp_path):
    first = posts(60)
    first.to_csv(tmp_path / "day1.csv", index=False)
    out = tmp_path / "scored"
    result = score("--input", tmp_path / "day1.csv", "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint, "--chunk-rows", "25")
    assert summary(result) == {"read": 60, "scored": 58, "skipped": 0, "bad": 2}
    model = model_name(checkpoint)
    check_results(pd.read_parquet(out), expected(checkpoint, first), model)
    bad = pd.read_parquet(out / "_bad_rows").sort_values("id")
    assert list(bad["id"].astype(int)) == [4, 8] and list(bad["reason"]) == ["NULL text", "empty text"]
    assert list(bad["row"]) == [4, 8] and bad["source"].str.endswith("day1.csv").all()
    # the next day: yesterday's file again plus a new one; only the new posts are scored, nothing is recorded twice
    second = posts(20, start=61, seed=1)
    second.to_csv(tmp_path / "day2.csv", index=False)
    result = score("--input", tmp_path / "day*.csv", "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(result) == {"read": 80, "scored": 18, "skipped": 60, "bad": 2}
    both = pd.concat([first, second])
    check_results(pd.read_parquet(out), expected(checkpoint, both), model)
    assert len(pd.read_parquet(out / "_bad_rows")) == 4


def test_sqlite_table_scored_into_its_database_with_where(checkpoint, tmp_path):
    database = tmp_path / "crawl.db"
    table = posts(50)
    with sqlite3.connect(database) as connection:
        table.to_sql("weibo_note", connection, index=False)
    url = f"sqlite:///{database}"
    args = ("--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint, "--chunk-rows", "16")
    result = score(*args, "--where", "note_id <= 30")
    assert summary(result) == {"read": 30, "scored": 28, "skipped": 0, "bad": 2}
    result = score(*args)
    assert summary(result) == {"read": 50, "scored": 20, "skipped": 30, "bad": 0}
    engine = sa.create_engine(url)
    scored = pd.read_sql_table("weibo_note_sentiment", engine)
    check_results(scored, expected(checkpoint, table), model_name(checkpoint))
    assert set(scored.columns) == {"id", "label", "sentiment", "confidence", "prob_positive", "model", "scored_at", "text_digest"}
    bad = pd.read_sql_table("weibo_note_sentiment_bad", engine)
    assert sorted(bad["id"]) == [4, 8]
    engine.dispose()


def test_jsonl_folder_into_a_csv(checkpoint, tmp_path):
    folder = tmp_path / "crawl"
    folder.mkdir()
    table = posts(30)
    table.iloc[:15].to_json(folder / "a.jsonl", orient="records", lines=True, force_ascii=False)
    table.iloc[15:].to_json(folder / "b.jsonl", orient="records", lines=True, force_ascii=False)
    out = tmp_path / "scored.csv"
    assert summary(score("--input", folder, "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint)) == {
        "read": 30, "scored": 28, "skipped": 0, "bad": 2}
    check_results(pd.read_csv(out), expected(checkpoint, table), model_name(checkpoint))
    assert list(pd.read_csv(tmp_path / "scored.bad.csv")["reason"]) == ["NULL text", "empty text"]
    assert summary(score("--input", folder, "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint))["skipped"] == 30


@pytest.mark.parametrize("sink", ["parquet", "sqlite", "postgresql", "mariadb", "csv"])
def test_killed_mid_run_and_started_again_scores_every_row_once(checkpoint, tmp_path, sink, request):
    table = posts(1500)
    source = tmp_path / "posts.parquet"
    table.to_parquet(source)
    if sink in ("postgresql", "mariadb"):
        output = request.getfixturevalue(f"{'postgres' if sink == 'postgresql' else 'mariadb'}_url")
        with sa.create_engine(output).begin() as connection:
            connection.execute(sa.text("drop table if exists scored, scored_bad"))
    else:
        output = {"parquet": tmp_path / "scored", "sqlite": f"sqlite:///{tmp_path / 'out.db'}", "csv": tmp_path / "scored.csv"}[sink]
    args = [sys.executable, str(SCORE), "--input", str(source), "--output", str(output), "--id-column", "note_id",
            "--checkpoint", str(checkpoint), "--chunk-rows", "20", *FP32]
    if sink in ("sqlite", "postgresql", "mariadb"):
        args += ["--output-table", "scored"]
        database = sa.create_engine(output)

    def written():
        if sink == "parquet":
            return len(glob.glob(str(output / "*.parquet")))
        if sink == "csv":
            return output.stat().st_size // 1000 if output.exists() else 0
        try:
            with database.connect() as connection:
                return connection.execute(sa.text("select count(*) from scored")).scalar_one() // 20
        except sa.exc.DBAPIError:  # not made yet
            return 0

    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while written() < 5 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be killed: make the input larger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result)
    assert counts["skipped"] > 0 and counts["read"] == 1500
    if sink == "parquet":
        frame = pd.read_parquet(output)
    elif sink == "csv":
        frame = pd.read_csv(output)
    else:
        frame = pd.read_sql_table("scored", database)
        database.dispose()
    check_results(frame, expected(checkpoint, table), model_name(checkpoint))


def test_bad_input_is_named(checkpoint, tmp_path):
    table = posts(5)
    table.to_csv(tmp_path / "p.csv", index=False)
    result = score("--input", tmp_path / "p.csv", "--output", tmp_path / "o", "--checkpoint", checkpoint, expect=2)
    assert "no column 'id' (--id-column)" in result.stderr and "note_id, content" in result.stderr
    sqlite3.connect(tmp_path / "x.db").close()
    result = score("--input", f"sqlite:///{tmp_path / 'x.db'}", "--table", "weibo_note", "--checkpoint", checkpoint, expect=2)
    assert "no table 'weibo_note'" in result.stderr
    result = score("--input", "postgresql+psycopg://crawler:secret@127.0.0.1:1/crawl", "--table", "weibo_note", "--checkpoint", checkpoint, expect=2)
    assert "crawler:***@127.0.0.1:1/crawl: cannot connect" in result.stderr and "secret" not in result.stderr
    result = score("--input", tmp_path / "nothing.csv", "--output", tmp_path / "o", "--checkpoint", checkpoint, expect=2)
    assert "no such file" in result.stderr and "Traceback" not in result.stderr
    from filelock import FileLock

    with FileLock(f"{tmp_path / 'o.csv'}.lock"):  # another run writing the same output
        result = score("--input", tmp_path / "p.csv", "--output", tmp_path / "o.csv", "--id-column", "note_id", "--checkpoint", checkpoint, expect=2)
    assert "being written by another score.py run" in result.stderr


def test_postgresql_table_scored_incrementally(checkpoint, postgres_url):
    engine = sa.create_engine(postgres_url)
    table = posts(40)
    with engine.begin() as connection:
        connection.execute(sa.text("drop table if exists weibo_note, weibo_note_sentiment, weibo_note_sentiment_bad"))
        connection.execute(sa.text("create table weibo_note (note_id varchar(64) primary key, content text)"))
    table.iloc[:25].assign(note_id=table["note_id"].astype(str)).to_sql("weibo_note", engine, if_exists="append", index=False)
    args = ("--input", postgres_url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint, "--chunk-rows", "10")
    assert summary(score(*args)) == {"read": 25, "scored": 23, "skipped": 0, "bad": 2}
    table.iloc[25:].assign(note_id=table["note_id"].astype(str)).to_sql("weibo_note", engine, if_exists="append", index=False)
    assert summary(score(*args)) == {"read": 40, "scored": 15, "skipped": 25, "bad": 0}
    scored = pd.read_sql_table("weibo_note_sentiment", engine)
    check_results(scored, expected(checkpoint, table), model_name(checkpoint))
    with engine.connect() as connection:
        kinds = dict(connection.execute(sa.text(
            "select column_name, data_type from information_schema.columns where table_name = 'weibo_note_sentiment'")).all())
    assert kinds["id"] == "character varying"  # the id column keeps the input's type
    engine.dispose()


def test_spark_engine_scores_a_parquet_folder_like_the_local_engine(checkpoint, tmp_path):
    pytest.importorskip("pyspark")
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    table = posts(40)
    table.iloc[:30].to_parquet(crawl / "part-1.parquet")
    spark = ("--engine", "spark", "--master", "local[2]", "--input", crawl, "--output", tmp_path / "spark_out",
             "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(score(*spark)) == {"read": 30, "scored": 28, "skipped": 0, "bad": 2}
    table.iloc[30:].to_parquet(crawl / "part-2.parquet")
    assert summary(score(*spark)) == {"read": 40, "scored": 10, "skipped": 30, "bad": 0}
    check_results(pd.read_parquet(tmp_path / "spark_out"), expected(checkpoint, table), model_name(checkpoint))
    bad = pd.read_parquet(tmp_path / "spark_out" / "_bad_rows")
    assert sorted(bad["id"]) == [4, 8] and set(bad["reason"]) == {"NULL text", "empty text"}
    # the local engine sees the Spark run's results as already scored: one sink, either engine
    result = score("--input", crawl, "--output", tmp_path / "spark_out", "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(result) == {"read": 40, "scored": 0, "skipped": 40, "bad": 0}
    # an edited post and a post given the text it lacked are scored again, by either engine, and only they
    edited = table.iloc[30:].copy()
    edited.loc[32, "content"] = "改了：今天真是太开心了"
    edited.to_parquet(crawl / "part-2.parquet")
    assert summary(score(*spark)) == {"read": 40, "scored": 1, "skipped": 39, "bad": 0}
    first = table.iloc[:30].copy()
    first.loc[3, "content"] = "补上的内容，好难过"
    first.to_parquet(crawl / "part-1.parquet")
    result = score("--input", crawl, "--output", tmp_path / "spark_out", "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(result) == {"read": 40, "scored": 1, "skipped": 39, "bad": 0}
    assert summary(score(*spark)) == {"read": 40, "scored": 0, "skipped": 40, "bad": 0}
    latest = pd.read_parquet(tmp_path / "spark_out").sort_values("scored_at").groupby("id").last()
    classifier = Classifier.load(checkpoint, mixed_precision="no")
    for note in (33, 4):
        text = (edited if note == 33 else first).set_index("note_id").loc[note, "content"]
        assert latest.loc[note, "prob_positive"] == pytest.approx(classifier.predict([text])[0]["prob_positive"], abs=1e-5)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_spark_engine_scores_a_database_table_through_jdbc(checkpoint, tmp_path, database, request):
    pytest.importorskip("pyspark")
    from weibo_senti.scoring import JDBC_DRIVERS

    _, jar, package = JDBC_DRIVERS[database]
    if not Path(jar).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no JDBC driver at {jar}: .ci/run installs {package}")
        pytest.skip(f"no JDBC driver here (apt-get install {package})")
    url = f"sqlite:///{tmp_path / 'crawl.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = sa.create_engine(url)
    table = posts(40)
    with engine.begin() as connection:
        for name in ("spark_note", "spark_note_sentiment", "spark_note_sentiment_bad"):
            connection.execute(sa.text(f"drop table if exists {name}"))
        connection.execute(sa.text("create table spark_note (note_id bigint primary key, content text)"))
    table.to_sql("spark_note", engine, if_exists="append", index=False)
    args = ("--engine", "spark", "--master", "local[2]", "--input", url, "--table", "spark_note", "--id-column", "note_id",
            "--checkpoint", checkpoint)
    assert summary(score(*args, "--where", "note_id <= 30")) == {"read": 30, "scored": 28, "skipped": 0, "bad": 2}
    assert summary(score(*args)) == {"read": 40, "scored": 10, "skipped": 30, "bad": 0}
    scored = pd.read_sql_table("spark_note_sentiment", engine)
    check_results(scored, expected(checkpoint, table), model_name(checkpoint))
    bad = pd.read_sql_table("spark_note_sentiment_bad", engine)
    assert sorted(bad["id"]) == [4, 8] and set(bad["reason"]) == {"NULL text", "empty text"}
    # the tables are the local engine's: it finds everything already scored
    local = ("--input", url, "--table", "spark_note", "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(score(*local)) == {"read": 40, "scored": 0, "skipped": 40, "bad": 0}
    with engine.begin() as connection:  # a re-crawl edits one post: Spark replaces its result in the table
        connection.execute(sa.text("update spark_note set content = '改了：今天真是太开心了' where note_id = 12"))
    assert summary(score(*args)) == {"read": 40, "scored": 1, "skipped": 39, "bad": 0}
    scored = pd.read_sql_table("spark_note_sentiment", engine).set_index("id")
    assert len(scored) == 38 and scored.loc[12, "prob_positive"] == pytest.approx(
        Classifier.load(checkpoint, mixed_precision="no").predict(["改了：今天真是太开心了"])[0]["prob_positive"], abs=1e-5)
    engine.dispose()


def _crawl_table(url, rows=60, duplicate_at=None):
    """MediaCrawler's weibo_note, in short: note_id BIGINT (no key: a crawl may repeat one), content, create_time seconds."""
    engine = sa.create_engine(url)
    table = posts(rows)
    if duplicate_at is not None:
        table = pd.concat([table.iloc[:duplicate_at], table.iloc[[duplicate_at - 1]], table.iloc[duplicate_at:]], ignore_index=True)
    table["create_time"] = 1_764_000_000 + table["note_id"]
    with engine.begin() as connection:
        for name in ("weibo_note_sentiment_bad", "weibo_note_sentiment", "weibo_note", "victim"):
            connection.execute(sa.text(f"drop table if exists {name}"))
        connection.execute(sa.text("create table weibo_note (note_id bigint, content text, create_time bigint)"))
        connection.execute(sa.text("create table victim (x integer)"))
    table.to_sql("weibo_note", engine, if_exists="append", index=False)
    return engine


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_where_is_one_bracketed_read_only_condition(checkpoint, tmp_path, database, request):
    url = f"sqlite:///{tmp_path / 'crawl.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = _crawl_table(url)
    args = ("--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint, "--chunk-rows", "10")
    # unbracketed, 'A OR B AND id > last' re-read the same page forever
    assert summary(score(*args, "--where", "note_id <= 5 OR note_id > 50"))["read"] == 15
    # a trailing comment used to swallow the paging condition
    assert summary(score(*args, "--output-table", "other", "--where", "note_id <= 25 --"))["read"] == 25
    result = score(*args, "--where", "1=1; DROP TABLE victim", expect=2)
    assert "would start a second statement" in result.stderr and "Traceback" not in result.stderr
    assert "victim" in sa.inspect(engine).get_table_names()
    # an unbalanced bracket used to escape the brackets: "read" millions of rows of a 300-row table (issue 44)
    for escaping, problem in [("1=1) OR (1=1", "closes a bracket that was never opened"),
                              ("note_id <= 25 -- (\n) OR (1=1 -- )", "could hide a bracket"),
                              ("(note_id <= 25", "'(' never closed"), ("note_id = 'x", "never closed")]:
        result = score(*args, "--where", escaping, expect=2)
        assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1 + escaping.count("\n"), result.stderr
    engine.dispose()


def test_a_where_the_database_refuses_is_one_line_before_any_table_is_made(checkpoint, postgres_url):
    engine = _crawl_table(postgres_url)
    result = score("--input", postgres_url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint,
                   "--where", "create_time > '2026-11-24'", expect=2)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--where \"create_time > '2026-11-24'\"" in result.stderr and "bigint" in result.stderr.lower()
    assert "weibo_note_sentiment" not in sa.inspect(engine).get_table_names()
    engine.dispose()


def test_a_where_that_matches_nothing_says_so(checkpoint, tmp_path):
    url = f"sqlite:///{tmp_path / 'crawl.db'}"
    _crawl_table(url).dispose()
    result = score("--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint,
                   "--where", "create_time > '2026-11-24'")  # SQLite compares a number with text: never true
    assert "matches no row of weibo_note" in result.stderr and "create_time BIGINT" in result.stderr
    assert summary(result)["read"] == 0


def test_an_id_repeated_across_a_page_boundary_is_read_and_counted(checkpoint, tmp_path):
    url = f"sqlite:///{tmp_path / 'crawl.db'}"
    _crawl_table(url, rows=30, duplicate_at=10).dispose()  # note_id 10 twice, the second copy would open page 2
    result = score("--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint, "--chunk-rows", "10")
    assert summary(result) == {"read": 31, "scored": 28, "skipped": 0, "bad": 3}
    bad = pd.read_sql_table("weibo_note_sentiment_bad", sa.create_engine(url))
    assert "duplicate id (an earlier row with this id is scored)" in set(bad["reason"])


def test_spark_engine_runs_the_onnx_backend_exported_once_for_all_its_workers(checkpoint, tmp_path):
    pytest.importorskip("pyspark")
    copy = shutil.copytree(checkpoint, tmp_path / "checkpoint", ignore=shutil.ignore_patterns("onnx"))  # not exported yet
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    table = posts(40)
    table.iloc[:20].to_parquet(crawl / "part-1.parquet")
    table.iloc[20:].to_parquet(crawl / "part-2.parquet")
    result = run_script(SCORE, "--engine", "spark", "--master", "local[2]", "--input", crawl, "--output", tmp_path / "out",
                        "--id-column", "note_id", "--checkpoint", copy, "--mixed-precision", "no", "--backend", "onnx")
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(result) == {"read": 40, "scored": 38, "skipped": 0, "bad": 2}
    assert len(list((copy / "onnx").glob("*/export.json"))) == 1  # the two workers waited for one export
    check_results(pd.read_parquet(tmp_path / "out"), expected(copy, table), model_name(copy))  # PyTorch fp32's, to 1e-5


def test_spark_workers_run_the_interpreter_that_runs_score_py(checkpoint, tmp_path):
    pytest.importorskip("pyspark")
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("python3", "python"):  # what a PATH without the venv finds: a Python without pandas
        (fake / name).write_text("#!/bin/sh\necho 'not the venv python' >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    java = Path(shutil.which("java")).resolve().parent
    env = {key: value for key, value in os.environ.items() if key not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env["PATH"] = os.pathsep.join([str(fake), str(java), "/usr/bin", "/bin"])
    posts(20).to_parquet(tmp_path / "crawl.parquet")
    result = subprocess.run(
        [sys.executable, str(SCORE), "--engine", "spark", "--master", "local[1]", "--input", tmp_path / "crawl.parquet",
         "--output", tmp_path / "out", "--id-column", "note_id", "--checkpoint", checkpoint, *FP32],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(result) == {"read": 20, "scored": 18, "skipped": 0, "bad": 2}


def test_a_spark_that_cannot_start_leaves_no_output_tables(checkpoint, tmp_path):
    pytest.importorskip("pyspark")
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'crawl.db'}"
    posts(12).to_sql("weibo_note", sa.create_engine(url), index=False)
    env = {**os.environ, "JAVA_HOME": str(tmp_path / "no-java"), "PATH": "/usr/local/bin:/bin"}  # no java anywhere
    result = subprocess.run(
        [sys.executable, str(SCORE), "--engine", "spark", "--master", "local[1]", "--input", url, "--table", "weibo_note",
         "--id-column", "note_id", "--text-column", "content", "--checkpoint", checkpoint, *FP32],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 2 and "error: cannot start Spark" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert sa.inspect(sa.create_engine(url)).get_table_names() == ["weibo_note"]


def test_an_output_csv_that_score_py_did_not_write_is_left_untouched(checkpoint, tmp_path):
    posts(5).to_csv(tmp_path / "p.csv", index=False)
    theirs = tmp_path / "theirs.csv"
    theirs.write_bytes(b"name,notes\nalice,keep me")  # no final newline: once taken for a killed run's half line
    result = score("--input", tmp_path / "p.csv", "--output", theirs, "--id-column", "note_id", "--checkpoint", checkpoint, expect=2)
    assert "not a file score.py wrote" in result.stderr and "Traceback" not in result.stderr
    assert theirs.read_bytes() == b"name,notes\nalice,keep me"


def test_integer_ids_stay_integers_beside_a_missing_one(checkpoint, tmp_path):
    big = 4_987_654_321_098_765_432  # a Weibo-sized id: a float64 cannot hold it
    rows = [{"note_id": big + i, "content": text} for i, (_, text) in enumerate(tiny.synthetic_rows(6))]
    rows[2]["note_id"] = None
    (tmp_path / "crawl.jsonl").write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "crawl.parquet")  # note_id: int64 with a null
    for name in ("crawl.jsonl", "crawl.parquet"):
        out = tmp_path / f"out-{name.replace('.', '-')}"
        args = ("--input", tmp_path / name, "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint)
        assert summary(score(*args)) == {"read": 6, "scored": 5, "skipped": 0, "bad": 1}
        assert summary(score(*args)) == {"read": 6, "scored": 0, "skipped": 5, "bad": 1}  # (a row without id is bad each run)
        ids = pd.read_parquet(out)["id"]
        assert ids.dtype == "int64" and sorted(ids) == sorted(r["note_id"] for r in rows if r["note_id"] is not None)
    # text ids into an integer output: refused with the id, never a broken output
    (tmp_path / "more.jsonl").write_text(json.dumps({"note_id": "abc", "content": "好开心"}) + "\n")
    result = score("--input", tmp_path / "more.jsonl", "--output", tmp_path / "out-crawl-jsonl", "--id-column", "note_id",
                   "--checkpoint", checkpoint, expect=2)
    assert "holds integer ids, and this input has the id 'abc'" in result.stderr


def test_json_lines_that_are_not_objects_are_named(checkpoint, tmp_path):
    (tmp_path / "crawl.jsonl").write_text('{"note_id": 1, "content": "好"}\n[1, "坏"]\n')
    result = score("--input", tmp_path / "crawl.jsonl", "--output", tmp_path / "out", "--id-column", "note_id",
                   "--checkpoint", checkpoint, expect=2)
    assert "crawl.jsonl: line 2 is a JSON list, not an object" in result.stderr and "Traceback" not in result.stderr


def test_an_output_inside_the_input_folder_is_refused_on_the_first_run(checkpoint, tmp_path):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    posts(5).to_csv(crawl / "p.csv", index=False)
    result = score("--input", crawl, "--output", crawl / "scored", "--id-column", "note_id", "--checkpoint", checkpoint, expect=2)
    assert "lies inside the input folder" in result.stderr
    assert not (crawl / "scored").exists()


def test_a_missing_sqlite_input_is_named_and_not_created(checkpoint, tmp_path):
    result = score("--input", f"sqlite:///{tmp_path / 'new.db'}", "--table", "weibo_note", "--checkpoint", checkpoint, expect=2)
    assert "no such SQLite file" in result.stderr and not (tmp_path / "new.db").exists()


def test_a_full_or_read_only_output_is_one_line(checkpoint, tmp_path):
    posts(12).to_csv(tmp_path / "p.csv", index=False)
    args = ("--input", tmp_path / "p.csv", "--id-column", "note_id", "--checkpoint", checkpoint)
    (tmp_path / "full.csv").symlink_to("/dev/full")  # every write: ENOSPC, as on a full disk
    result = score(*args, "--output", tmp_path / "full.csv", expect=2)
    assert "cannot write (No space left on device)" in result.stderr and "Traceback" not in result.stderr
    sqlite3.connect(tmp_path / "ro.db").close()
    result = score(*args, "--output", f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true", "--output-table", "scored", expect=2)
    assert "cannot create the output tables" in result.stderr and "readonly" in result.stderr and "Traceback" not in result.stderr


def test_a_refused_second_run_leaves_the_first_runs_files_alone(checkpoint, tmp_path):
    from filelock import FileLock

    posts(5).to_csv(tmp_path / "p.csv", index=False)
    out = tmp_path / "out"
    out.mkdir()
    unfinished = out / ".part-of-the-first-run.parquet.tmp"
    unfinished.write_bytes(b"being written")
    with FileLock(out / ".score.lock"):
        result = score("--input", tmp_path / "p.csv", "--output", out, "--id-column", "note_id", "--checkpoint", checkpoint, expect=2)
    assert "being written by another score.py run" in result.stderr and unfinished.exists()


def test_two_runs_into_one_table_both_finish(checkpoint, tmp_path):
    url = f"sqlite:///{tmp_path / 'crawl.db'}"
    _crawl_table(url, rows=200).dispose()
    args = [sys.executable, str(SCORE), "--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint",
            str(checkpoint), "--chunk-rows", "20", *FP32]
    runs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
    scored = pd.read_sql_table("weibo_note_sentiment", sa.create_engine(url))
    assert len(scored) == 198 and scored["id"].is_unique


MEDIACRAWLER_WEIBO_NOTE = {  # MediaCrawler's weibo_note, in the columns score.py and its users touch
    "sqlite": "create table weibo_note (id integer primary key autoincrement, note_id bigint, content text, create_time bigint, "
              "create_date_time text, last_modify_ts bigint)",
    "postgresql": "create table weibo_note (id serial primary key, note_id bigint, content text, create_time bigint, "
                  "create_date_time text, last_modify_ts bigint)",
    "mariadb": "create table weibo_note (id int not null auto_increment primary key, note_id varchar(64), content longtext, "
               "create_time bigint, create_date_time varchar(32), last_modify_ts bigint) character set utf8mb4",
}


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"])
def test_mediacrawler_weibo_note_scored_where_created_after_and_edited_posts_rescored_once(checkpoint, tmp_path, database, request):
    """The docs' MediaCrawler recipe: --where on create_time seconds, BettaFish's async URL, a re-crawl that edits a
    post, the rerun that scores that post alone, and the join that puts the current sentiment on the posts."""
    url = {"sqlite": f"sqlite:///{tmp_path / 'media_crawler.db'}", "postgresql": None, "mariadb": None}[database]
    url = url or request.getfixturevalue("postgres_url" if database == "postgresql" else "mariadb_url")
    engine = sa.create_engine(url)
    notes = posts(30, start=4_900_000_000_000_000)  # Weibo-sized note ids
    notes["create_time"] = 1_795_000_000 + 3600 * notes.index
    notes["create_date_time"] = "2026-11-18 00:00:00"
    notes["last_modify_ts"] = notes["create_time"] * 1000
    with engine.begin() as connection:
        for name in ("weibo_note_sentiment_bad", "weibo_note_sentiment", "weibo_note"):
            connection.execute(sa.text(f"drop table if exists {name}"))
        connection.execute(sa.text(MEDIACRAWLER_WEIBO_NOTE[database]))
    notes.to_sql("weibo_note", engine, if_exists="append", index=False)
    since = int(notes["create_time"][10])  # notes 10-29: 20 rows, the NULL and blank ones (3, 7) before it
    as_bettafish_has_it = url.replace("+psycopg", "+asyncpg").replace("+pymysql", "+aiomysql")
    args = ("--input", as_bettafish_has_it, "--table", "weibo_note", "--id-column", "note_id", "--text-column", "content",
            "--where", f"create_time >= {since}", "--checkpoint", checkpoint)
    first = score(*args)
    assert summary(first) == {"read": 20, "scored": 20, "skipped": 0, "bad": 0}
    if database != "sqlite":
        assert "score.py works synchronously, so it uses" in first.stderr

    edited, old_one = notes["note_id"][12], notes["note_id"][2]  # a re-crawl upserts the content of two notes
    with engine.begin() as connection:
        for note in (edited, old_one):
            connection.execute(sa.text("update weibo_note set content = :text, last_modify_ts = last_modify_ts + 1 where note_id = :id"),
                               {"text": "改了：今天真是太开心了，谢谢大家", "id": str(note) if database == "mariadb" else int(note)})
    assert summary(score(*args)) == {"read": 20, "scored": 1, "skipped": 19, "bad": 0}
    assert summary(score(*args)) == {"read": 20, "scored": 0, "skipped": 20, "bad": 0}

    model = model_name(checkpoint)
    join = sa.text("select n.note_id, n.content, s.sentiment, s.prob_positive from weibo_note n "
                   "join weibo_note_sentiment s on s.id = n.note_id and s.model = :model where n.create_time >= :since")
    with engine.connect() as connection:
        rows = connection.execute(join, {"model": model, "since": since}).all()
    engine.dispose()
    assert len(rows) == 20
    classifier = Classifier.load(checkpoint, mixed_precision="no")
    for note_id, content, sentiment, prob_positive in rows:
        want = classifier.predict([content])[0]
        assert sentiment == want["sentiment"] and abs(prob_positive - want["prob_positive"]) < 1e-5, (note_id, content)


@pytest.mark.parametrize("database", ["sqlite", "postgresql", "mariadb"])
def test_a_post_a_recrawl_blanks_loses_its_old_sentiment(checkpoint, tmp_path, database, request):
    url = f"sqlite:///{tmp_path / 'crawl.db'}" if database == "sqlite" else request.getfixturevalue(f"{database.replace('postgresql', 'postgres')}_url")
    engine = _crawl_table(url, rows=20)
    args = ("--input", url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint)
    assert summary(score(*args)) == {"read": 20, "scored": 18, "skipped": 0, "bad": 2}
    with engine.begin() as connection:
        connection.execute(sa.text("update weibo_note set content = '' where note_id = 5"))
    assert summary(score(*args)) == {"read": 20, "scored": 0, "skipped": 19, "bad": 1}
    join = sa.text("select s.id from weibo_note n join weibo_note_sentiment s on s.id = n.note_id where n.note_id = 5")
    with engine.connect() as connection:
        assert connection.execute(join).all() == []  # the docs' JOIN returns no stale sentiment for it
        assert connection.execute(sa.text("select count(*) from weibo_note_sentiment_bad where id = 5")).scalar() == 1
    engine.dispose()


def test_on_mariadb_the_output_ids_keep_the_source_collation_and_a_text_against_a_number_is_refused(checkpoint, mariadb_url):
    engine = sa.create_engine(mariadb_url)
    with engine.begin() as connection:
        for name in ("weibo_note_sentiment_bad", "weibo_note_sentiment", "weibo_note"):
            connection.execute(sa.text(f"drop table if exists {name}"))
        connection.execute(sa.text("create table weibo_note (note_id varchar(64) collate utf8mb4_bin, content longtext, "
                                   "create_time bigint) character set utf8mb4 collate utf8mb4_unicode_ci"))
    frame = posts(12)
    frame["note_id"] = frame["note_id"].astype(str)
    frame["create_time"] = 1_795_000_000
    frame.to_sql("weibo_note", engine, if_exists="append", index=False)
    args = ("--input", mariadb_url, "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint)
    result = score(*args, "--where", "create_time >= '2026-11-24'", expect=2)
    assert "create_time is a BIGINT column compared with the text '2026-11-24'" in result.stderr and "2026" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "weibo_note_sentiment" not in sa.inspect(engine).get_table_names()
    assert summary(score(*args))["scored"] == 10
    join = sa.text("select count(*) from weibo_note n join weibo_note_sentiment s on s.id = n.note_id")  # no mix of collations
    with engine.connect() as connection:
        assert connection.execute(join).scalar() == 10
    engine.dispose()


@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_bettafish_s_own_database_settings_name_the_input(checkpoint, database, request):
    url = sa.make_url(request.getfixturevalue("postgres_url" if database == "postgresql" else "mariadb_url"))
    engine = _crawl_table(url.render_as_string(hide_password=False), rows=12)
    settings = {"DB_DIALECT": "postgresql" if database == "postgresql" else "mysql", "DB_HOST": url.host, "DB_PORT": str(url.port),
                "DB_USER": url.username, "DB_PASSWORD": url.password or "", "DB_NAME": url.database}
    result = run_script(SCORE, "--input", "bettafish", "--table", "weibo_note", "--id-column", "note_id", "--checkpoint", checkpoint,
                        *FP32, env_extra=settings)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(result) == {"read": 12, "scored": 10, "skipped": 0, "bad": 2}
    assert "weibo_note_sentiment" in sa.inspect(engine).get_table_names()
    engine.dispose()
    unset = run_script(SCORE, "--input", "bettafish", "--table", "weibo_note", env_extra={"DB_HOST": ""})
    assert unset.returncode == 2 and "DB_HOST" in unset.stderr and "DATABASE_URL" in unset.stderr
