"""Score a whole crawl (score.py): CSV / JSON-lines / Parquet files or a database table in; a Parquet folder, a CSV or
a database table out. In chunks with bounded memory, incremental (a row the sink already holds for the same model and
the same text is skipped; one whose text changed since, as a re-crawl's upsert changes it, is scored again) and safe to
kill at any moment: a database chunk is one transaction, a Parquet part file is renamed into place,
a CSV sink loses at most its unfinished last line, which the next run removes and scores again.

Rows that cannot be scored (no id, NULL, empty or non-text content) go to a side table or file with the reason:
<table>_bad, <folder>/_bad_rows/, <csv stem>.bad.csv. They count as handled: a rerun does not record them again.
"""
import glob
import hashlib
import importlib
import json
import numbers
import os
import re
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout
from tqdm import tqdm

from . import UserError
from .data import DataError
from .predict import SENTIMENTS, runtime_options, text_problem

RESULT_COLUMNS = ["id", "label", "sentiment", "confidence", "prob_positive", "model", "scored_at", "text_digest"]
BAD_COLUMNS = ["id", "reason", "source", "row", "model", "seen_at", "text_digest"]
DIGEST_CHARS = 16  # of the text's SHA-256 in hex: what a rerun compares to find the rows whose text changed
FILE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


FILESYSTEM_SCHEMES = ("file", "hdfs", "viewfs", "s3", "s3a", "s3n", "gs", "abfs", "abfss", "wasb", "wasbs")  # Spark's, not SQL


def is_database(location):
    return "://" in str(location) and str(location).split("://")[0].lower() not in FILESYSTEM_SCHEMES


def is_remote_path(location):
    return "://" in str(location) and not is_database(location)


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


NULL_TEXT = "\x00null"  # what a NULL (or missing) text is digested as, so that a post given a text later differs from it


def text_digest(text):
    """The first DIGEST_CHARS hex digits of the SHA-256 of the text's UTF-8 (Spark's sha2 gives the same), a value
    that is not text taken as its string, NULL as NULL_TEXT. A NULL digest in an output is a row from before digests."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        text = NULL_TEXT
    return hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_CHARS]


def already_done(ids, digests, latest, bad):
    """For each row: does the sink hold it already? latest: {str(id): digest of its current result}; bad: {str(id):
    digests recorded as bad}. A row is done when its text is the one last scored for its id, or one already found bad;
    a NULL digest (a result written before digests were kept) counts as the same text."""
    done = []
    for identifier, digest in zip(ids.tolist(), digests.tolist()):  # lists: iterating pandas' Arrow strings costs ~1 µs an item
        key = str(identifier)
        known = bad.get(key, set()) | ({latest[key]} if key in latest else set())
        done.append(digest in known or None in known)
    return pd.Series(done, index=ids.index)


# ---- sources: count() and chunks() of DataFrames with columns id, text, source, row


class FileSource:
    def __init__(self, location, id_column, text_column):
        self.id_column, self.text_column = id_column, text_column
        path = Path(location)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and not p.name.startswith((".", "_")))
        elif any(char in str(location) for char in "*?["):
            files = sorted(Path(p) for p in glob.glob(str(location), recursive=True) if Path(p).suffix in FILE_SUFFIXES)
        else:
            files = [path] if path.is_file() else []
            if not files:
                raise DataError(f"--input {location}: no such file or folder")
        if not files:
            raise DataError(f"--input {location}: no .csv, .jsonl or .parquet files there")
        for file in files:
            if file.suffix not in FILE_SUFFIXES:
                raise DataError(f"--input {file}: unknown kind of file; expected {', '.join(FILE_SUFFIXES)}")
        self.files = files

    def count(self):
        import pyarrow.parquet as pq

        total = 0
        for file in self.files:
            if FILE_SUFFIXES[file.suffix] == "parquet":
                total += pq.ParquetFile(file).metadata.num_rows
            else:
                with open(file, "rb") as handle:
                    total += sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))
                total -= FILE_SUFFIXES[file.suffix] == "csv"  # the header (an estimate: quoted newlines count too)
        return total

    def _frames(self, file, size):
        kind = FILE_SUFFIXES[file.suffix]
        columns = [self.id_column, self.text_column]
        if kind == "parquet":
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(file)
            self._check_columns(file, parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=size, columns=columns):
                # to_pylist, not to_pandas: an integer id column with a null would turn into floats
                yield pd.DataFrame({name: pd.Series(batch.column(name).to_pylist(), dtype=object) for name in columns})
        elif kind == "csv":
            header = pd.read_csv(file, nrows=0).columns
            self._check_columns(file, header)
            yield from pd.read_csv(file, chunksize=size, usecols=columns, dtype=str, keep_default_na=False, na_values=[""])
        else:
            yield from self._json_lines(file, size)

    def _json_lines(self, file, size):
        """JSON lines read by json itself: ids keep their exact type (an integer stays an integer, whatever else the chunk
        holds), and a line that is not an object is named."""
        rows, checked = [], False
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{file}: line {number} is not JSON ({error.msg} at column {error.colno})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{file}: line {number} is a JSON {type(record).__name__}, not an object with the columns "
                                    f"'{self.id_column}' and '{self.text_column}'")
                if not checked:
                    self._check_columns(file, list(record))
                    checked = True
                rows.append((record.get(self.id_column), record.get(self.text_column)))
                if len(rows) == size:
                    yield pd.DataFrame(rows, columns=[self.id_column, self.text_column], dtype=object)
                    rows = []
        if rows:
            yield pd.DataFrame(rows, columns=[self.id_column, self.text_column], dtype=object)

    def _check_columns(self, file, names):
        for option, column in (("--id-column", self.id_column), ("--text-column", self.text_column)):
            if column not in names:
                raise DataError(f"{file}: no column '{column}' ({option}); its columns: {', '.join(map(str, names))}")

    def chunks(self, size):
        for file in self.files:
            row = 0
            try:
                for frame in self._frames(file, size):
                    yield pd.DataFrame({
                        "id": frame[self.id_column].to_numpy(), "text": frame[self.text_column].to_numpy(),
                        "source": str(file), "row": range(row + 1, row + 1 + len(frame)),
                    })
                    row += len(frame)
            except (ValueError, OSError, UnicodeDecodeError) as error:  # a damaged file; our own DataError passes through
                raise DataError(f"{file}: cannot be read after row {row:,}: {error}") from None


class TableSource:
    """A table read in id order by keyset pages (WHERE id > last ORDER BY id LIMIT n): bounded memory, no long cursor.
    It reads through a read-only session, and --where is one condition, checked against the database before any
    output exists."""

    def __init__(self, url, table, id_column, text_column, where):
        import sqlalchemy as sa

        if not table:
            raise DataError(f"--input {url} is a database: name the table with --table")
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError as error:
            raise DataError(f"--input: not a database URL ({error})") from None
        database = parsed.database if parsed.get_backend_name() == "sqlite" else None
        if database and database != ":memory:" and not Path(database).is_file():
            raise DataError(f"--input {url}: no such SQLite file {database}")  # (connecting would create it, empty)
        self.engine = engine_for(url, read_only=True)
        names = sa.inspect(self.engine).get_table_names()
        if table not in names:
            raise DataError(f"{safe_url(url)}: no table '{table}' (tables: {', '.join(names) or 'none'})")
        self.table = sa.Table(table, sa.MetaData(), autoload_with=self.engine)
        for option, column in (("--id-column", id_column), ("--text-column", text_column)):
            if column not in self.table.c:
                raise DataError(f"{table}: no column '{column}' ({option}); its columns: {', '.join(self.table.c.keys())}")
        self.id, self.text = self.table.c[id_column], self.table.c[text_column]
        self.where = where_clause(where)
        if where and self.engine.dialect.name in ("mysql", "mariadb"):
            check_text_against_numbers(where, self.table)
        self.name = f"{table}"
        try:
            with self.engine.connect() as connection:
                self.rows = connection.execute(sa.select(sa.func.count()).select_from(self.table).where(self.where)).scalar_one()
        except sa.exc.DBAPIError as error:
            raise DataError(f"--where \"{where}\": {safe_url(url)} refused it: {database_message(error)}") from None
        if where and self.rows == 0:
            print(f"--where \"{where}\" matches no row of {table}: nothing to score (is the condition right for the "
                  f"column types? {', '.join(f'{c.name} {c.type}' for c in self.table.c)})", file=sys.stderr)

    def count(self):
        return self.rows

    def id_type_for_join(self):
        """The id column's type for an output table beside this one, so that a JOIN on the ids compares like with like:
        on MySQL and MariaDB a text id keeps its column's collation (one taken from the database's default instead
        fails the JOIN with "Illegal mix of collations")."""
        import sqlalchemy as sa

        id_type = self.id.type
        if not isinstance(id_type, sa.String) or self.engine.dialect.name not in ("mysql", "mariadb"):
            return id_type
        from sqlalchemy.dialects.mysql import VARCHAR

        with self.engine.connect() as connection:
            found = connection.execute(sa.text(
                "SELECT CHARACTER_SET_NAME, COLLATION_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = :table AND COLUMN_NAME = :column"), {"table": self.table.name, "column": self.id.name}).first()
        if not found or not found[1]:
            return id_type
        return VARCHAR(id_type.length or 255, charset=found[0], collation=found[1])

    def chunks(self, size):
        import sqlalchemy as sa

        last, row = None, 0
        with self.engine.connect() as connection:
            while True:
                query = sa.select(self.id, self.text).where(self.where, self.id.is_not(None))
                if last is not None:
                    query = query.where(self.id > last)
                rows = connection.execute(query.order_by(self.id).limit(size)).all()
                if len(rows) == size:  # rows sharing the page's last id may run past it: take them all, or the next page skips them
                    last_id = rows[-1][0]
                    same = connection.execute(sa.select(self.id, self.text).where(self.where, self.id == last_id)).all()
                    rows = [r for r in rows if r[0] != last_id] + same
                connection.rollback()  # end the read transaction between pages
                if not rows:
                    break
                last = rows[-1][0]
                yield pd.DataFrame({"id": [r[0] for r in rows], "text": [r[1] for r in rows], "source": self.name,
                                    "row": range(row + 1, row + 1 + len(rows))})
                row += len(rows)
            # rows without an id cannot be tracked: reported as bad each run (their count stays small, by nature)
            query = sa.select(self.text).where(self.where, self.id.is_(None))
            missing = connection.execute(query).scalars().all()
            if missing:
                yield pd.DataFrame({"id": [None] * len(missing), "text": missing, "source": self.name, "row": None})


def where_clause(where):
    """--where as one bracketed condition: an OR in it cannot escape the paging condition, a trailing -- comment ends at
    its own line, and a ';' (a second statement) is refused. The session is read-only besides (engine_for)."""
    import sqlalchemy as sa

    if not where:
        return sa.true()
    problem = condition_problem(where)
    if problem:
        raise DataError(f"--where \"{where}\": one condition is expected; {problem}")
    return sa.text(f"({where}\n)")


def condition_problem(where):
    """Why `where` is not one balanced condition that stays inside its brackets, or None. Quoted strings and identifiers
    are skipped; outside them a ';', a comment or a bracket closed before it opened could end the bracket it is put in."""
    if "\\" in where:
        return "a backslash reads differently in each database's strings: write the condition without one"
    depth, quote = 0, None
    for position, char in enumerate(where):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"`":
            quote = char
        elif char == ";":
            return f"a ';' outside quotes at character {position + 1} would start a second statement"
        elif where.startswith("--", position) and not any(c in where[position:] for c in "\n\r()'\"`;#"):
            break  # a trailing comment: it ends at the line break that closes the bracket, and hides nothing
        elif where.startswith(("--", "/*", "#"), position):
            return (f"the comment or operator {where[position:position + 2].strip()!r} at character {position + 1} could "
                    "hide a bracket: only a trailing '-- comment' without brackets or quotes is kept")
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return f"the ')' at character {position + 1} closes a bracket that was never opened"
    if quote:
        return f"a {quote} is never closed"
    if depth:
        return f"{depth} '(' never closed"
    return None


COMPARED_WITH_TEXT = re.compile(r"([A-Za-z_][\w.]*)\s*(?:=|<>|!=|<=>|<=|>=|<|>)\s*'([^']*)'|'([^']*)'\s*(?:=|<>|!=|<=>|<=|>=|<|>)\s*([A-Za-z_][\w.]*)")


def check_text_against_numbers(where, table):
    """MySQL and MariaDB compare a number column with a string as numbers, reading the string's leading digits
    ('2026-11-24' is 2026): --where "create_time >= '2026-11-24'" on MediaCrawler's BIGINT seconds matches every row,
    silently. Such a comparison with a string that is not a number is refused, naming the column and its type."""
    import sqlalchemy as sa

    for match in COMPARED_WITH_TEXT.finditer(where):
        column, value = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        name = column.rsplit(".", 1)[-1]
        if name not in table.c or not isinstance(table.c[name].type, (sa.Integer, sa.Numeric, sa.Float)):
            continue
        try:
            float(value)
        except ValueError:
            raise DataError(
                f"--where \"{where}\": {name} is a {table.c[name].type} column compared with the text '{value}', which MySQL and "
                f"MariaDB read as the number {value_as_mysql_number(value)} (so the condition matches rows it should not); "
                f"compare it with a number (MediaCrawler's create_time is seconds since 1970: date -d {value} +%s)") from None


def value_as_mysql_number(value):
    digits = re.match(r"\s*[-+]?\d*\.?\d*", value).group(0).strip()
    return digits if digits not in ("", "-", "+", ".") else "0"


def database_message(error):
    return " ".join(str(error.orig).split())[:300]


# per dialect, what makes a session read-only: a source never writes, whatever --where holds
READ_ONLY_SESSION = {
    "sqlite": "PRAGMA query_only = ON",
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "mariadb": "SET SESSION TRANSACTION READ ONLY",
}


# BettaFish and MediaCrawler configure async drivers; score.py reads and writes synchronously, so it takes the same
# database through the synchronous driver of requirements.txt
SYNC_DRIVERS = {"asyncpg": "psycopg", "psycopg_async": "psycopg", "aiomysql": "pymysql", "asyncmy": "pymysql", "aiosqlite": "pysqlite"}
_said = set()


def sync_url(url):
    """A SQLAlchemy URL with an async driver -> the same database through a synchronous one (said once)."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as error:
        raise DataError(f"not a database URL: {url} ({error})") from None
    driver = parsed.get_driver_name()
    if driver not in SYNC_DRIVERS or "+" not in parsed.drivername:
        return url
    synchronous = parsed.set(drivername=f"{parsed.get_backend_name()}+{SYNC_DRIVERS[driver]}")
    if parsed.drivername not in _said:
        _said.add(parsed.drivername)
        print(f"{parsed.drivername}: score.py works synchronously, so it uses {synchronous.drivername} for this database", file=sys.stderr)
    return synchronous.render_as_string(hide_password=False)


def engine_for(url, read_only=False):
    import sqlalchemy as sa

    url = sync_url(url)
    try:
        engine = sa.create_engine(url)
    except Exception as error:  # unknown dialect, missing driver
        raise DataError(f"{safe_url(url)}: {error}") from None
    if read_only and engine.dialect.name in READ_ONLY_SESSION:
        statement = READ_ONLY_SESSION[engine.dialect.name]

        @sa.event.listens_for(engine, "connect")
        def make_read_only(dbapi_connection, _):
            cursor = dbapi_connection.cursor()
            cursor.execute(statement)
            cursor.close()
            if engine.dialect.name == "postgresql":
                dbapi_connection.commit()
    try:
        with engine.connect():
            return engine
    except sa.exc.DBAPIError as error:  # no server, wrong password, no such database
        raise DataError(f"{safe_url(url)}: cannot connect: {str(error.orig).strip().splitlines()[0]}") from None


def safe_url(url):
    try:
        import sqlalchemy as sa

        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the database URL"


# ---- sinks: done(model, ids) -> boolean mask, write(results, bad)


class TableSink:
    def __init__(self, url, table, id_type=None):
        import sqlalchemy as sa

        self.engine = engine_for(url)
        metadata = sa.MetaData()
        id_type = id_type if id_type is not None else sa.String(255)
        self.table = sa.Table(
            table, metadata,
            sa.Column("id", id_type, nullable=False), sa.Column("label", sa.Integer), sa.Column("sentiment", sa.String(16)),
            sa.Column("confidence", sa.Float), sa.Column("prob_positive", sa.Float), sa.Column("model", sa.String(200), nullable=False),
            sa.Column("scored_at", sa.String(32)), sa.Column("text_digest", sa.String(DIGEST_CHARS)), sa.PrimaryKeyConstraint("id", "model"),
        )
        self.bad = sa.Table(
            f"{table}_bad", metadata,
            sa.Column("id", id_type), sa.Column("reason", sa.Text), sa.Column("source", sa.Text), sa.Column("row", sa.Integer),
            sa.Column("model", sa.String(200)), sa.Column("seen_at", sa.String(32)), sa.Column("text_digest", sa.String(DIGEST_CHARS)),
            sa.Index(f"ix_{table}_bad_model_id", "model", "id"),
        )
        existing = set(sa.inspect(self.engine).get_table_names())
        self.created = [t for t in (self.table, self.bad) if t.name not in existing]
        try:
            metadata.create_all(self.engine)  # existing tables are kept as they are; what they hold is checked below
        except sa.exc.DBAPIError as error:  # a read-only or full database; or a second run that made them just now
            if not {table, f"{table}_bad"} <= set(sa.inspect(self.engine).get_table_names()):
                raise DataError(f"{safe_url(url)}: cannot create the output tables {table}, {table}_bad: {database_message(error)}") from None
            metadata.create_all(self.engine)  # (the index, if the other run has not made it yet)
        self.name, self.lock_path = table, None
        reflected = {}
        for wanted, columns in ((self.table, RESULT_COLUMNS), (self.bad, BAD_COLUMNS)):
            reflected[wanted.name] = sa.Table(wanted.name, sa.MetaData(), autoload_with=self.engine)
            if "text_digest" not in reflected[wanted.name].c:  # a table made by a score.py that kept no digests
                with self.engine.begin() as connection:
                    connection.execute(sa.text(f"ALTER TABLE {self.engine.dialect.identifier_preparer.quote(wanted.name)} "
                                               f"ADD COLUMN text_digest VARCHAR({DIGEST_CHARS})"))
                reflected[wanted.name] = sa.Table(wanted.name, sa.MetaData(), autoload_with=self.engine)
            missing = [column for column in columns if column not in reflected[wanted.name].c]
            if missing:
                raise DataError(f"{safe_url(url)}: the table '{wanted.name}' exists without the columns {', '.join(missing)}; "
                                "choose another --output-table")
        self.ids_are_text = isinstance(reflected[table].c.id.type, sa.String)

    def drop_created_if_empty(self):
        """Undo the tables this run made, when it ends before writing anything (Spark could not start)."""
        import sqlalchemy as sa

        with self.engine.begin() as connection:
            for table in self.created:
                if connection.execute(sa.select(sa.func.count()).select_from(table)).scalar() == 0:
                    table.drop(connection)

    def _ids(self, ids):
        return [str(i) if self.ids_are_text else (i.item() if hasattr(i, "item") else i) for i in ids]

    def recorded(self, model, ids):
        """({str(id): digest of its result}, {str(id): digests recorded as bad}) for these ids and this model."""
        import sqlalchemy as sa

        latest, bad = {}, {}
        keys = self._ids(ids)
        with self.engine.connect() as connection:
            for identifier, digest in connection.execute(
                    sa.select(self.table.c.id, self.table.c.text_digest).where(self.table.c.model == model, self.table.c.id.in_(keys))):
                latest[str(identifier)] = digest
            for identifier, digest in connection.execute(
                    sa.select(self.bad.c.id, self.bad.c.text_digest).where(self.bad.c.model == model, self.bad.c.id.in_(keys))):
                bad.setdefault(str(identifier), set()).add(digest)
        return latest, bad

    def delete_results(self, model, ids):
        """Remove the results of these ids for this model (the Spark engine, before it appends their new ones)."""
        keys = self._ids(ids)
        with self.engine.begin() as connection:
            for start in range(0, len(keys), 1000):
                connection.execute(self.table.delete().where(self.table.c.model == model, self.table.c.id.in_(keys[start:start + 1000])))

    def _insert_results(self):
        """An insert that replaces the result of a row whose text changed, and rewrites the same result when another run
        wrote it meanwhile (two runs into one table: the same rows, no error)."""
        dialect = self.engine.dialect.name
        updated = [column for column in RESULT_COLUMNS if column not in ("id", "model")]
        if dialect in ("postgresql", "sqlite"):
            insert = importlib.import_module(f"sqlalchemy.dialects.{dialect}").insert(self.table)
            return insert.on_conflict_do_update(index_elements=["id", "model"], set_={c: insert.excluded[c] for c in updated})
        if dialect in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert

            insert = insert(self.table)
            return insert.on_duplicate_key_update({c: insert.inserted[c] for c in updated})
        return self.table.insert()

    def write(self, results, bad):
        with self.engine.begin() as connection:  # one transaction: the chunk is in, or none of it
            # a row now bad (a re-crawl blanked its text) loses the result of its old text: no query returns it as current
            for model, rows in bad[bad["id"].notna()].groupby("model"):
                keys = self._ids(rows["id"].tolist())
                for start in range(0, len(keys), 1000):
                    connection.execute(self.table.delete().where(self.table.c.model == model, self.table.c.id.in_(keys[start:start + 1000])))
            for statement, frame in ((self._insert_results(), results), (self.bad.insert(), bad)):
                if len(frame):
                    records = frame.astype(object).where(frame.notna(), None).to_dict("records")  # plain Python values
                    for record in records:
                        record["id"] = None if record["id"] is None else self._ids([record["id"]])[0]
                    connection.execute(statement, records)


class _IdsInMemory:
    """For file sinks, which only ever append: what was written for a model, read once (load_digests) and kept up to
    date by remember(). The newest result for an id (by scored_at) is its current one."""

    def recorded(self, model, ids):
        if model not in self.seen:
            self.seen[model] = ({}, {}, {})
            for frame, is_result in self.load_digests(model):
                self.remember_frame(model, frame, is_result)
        latest, bad, _ = self.seen[model]
        return latest, bad

    def remember(self, frame, is_result):
        for model, rows in frame.groupby("model"):
            if model in self.seen:
                self.remember_frame(model, rows, is_result)

    def remember_frame(self, model, frame, is_result):
        """latest: {id: digest} of the newest result by scored_at, kept in times (Spark's parts are not named in time order)."""
        latest, bad, times_seen = self.seen[model]
        digests = frame["text_digest"] if "text_digest" in frame else pd.Series(None, index=frame.index, dtype=object)
        times = frame["scored_at"] if "scored_at" in frame else pd.Series("", index=frame.index, dtype=object)
        for identifier, digest, when in zip(frame["id"].tolist(), digests.tolist(), times.tolist()):
            if identifier is None or (not isinstance(identifier, str) and pd.isna(identifier)):
                continue
            digest = None if digest is None or (not isinstance(digest, str) and pd.isna(digest)) or digest == "" else digest
            if not is_result:
                bad.setdefault(str(identifier), set()).add(digest)
            elif str(when) >= times_seen.get(str(identifier), ""):
                latest[str(identifier)] = digest
                times_seen[str(identifier)] = sys.intern(str(when))  # one time per chunk: interned, it is stored once


class ParquetSink(_IdsInMemory):
    """A folder of part files; each written under a temporary name and renamed into place. The ids already there for
    a model, with the digest of their text, are held in memory (about 230 bytes each) to skip them."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.bad_folder = self.folder / "_bad_rows"  # '_' prefix: Spark and pyarrow datasets do not read it as data
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"--output {folder}: a file is there; a Parquet output is a folder")
        self.bad_folder.mkdir(parents=True, exist_ok=True)
        self.seen, self.parts, self.id_type = {}, 0, None
        self.name, self.lock_path = str(folder), self.folder / ".score.lock"

    def recover(self):
        """Under the lock: remove the parts a killed run did not finish."""
        for leftover in [*self.folder.glob(".*.tmp"), *self.bad_folder.glob(".*.tmp")]:
            leftover.unlink()

    def load_digests(self, model):
        """(frame of id, text_digest and scored_at, is_result) per part."""
        import pyarrow.parquet as pq

        for folder, is_result in ((self.bad_folder, False), (self.folder, True)):
            for file in sorted(folder.glob("*.parquet")):  # file by file: older outputs may mix id types
                columns = [c for c in ("id", "text_digest", "scored_at") if c in pq.read_schema(file).names]
                table = pq.read_table(file, columns=columns, filters=[("model", "==", model)])
                yield pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object) for name in columns}), is_result

    def _id_array(self, ids):
        """The id column in the one type this output holds: its first part's, else integers where every id is one, else
        text. An integer id in a text output becomes its digits; a text id in an integer output is refused."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.id_type is None:
            first = next(iter(sorted(self.folder.glob("*.parquet"))), None)
            if first is not None:
                self.id_type = pq.read_schema(first).field("id").type
            else:
                integers = all(_is_integer(i) for i in ids if i is not None)
                self.id_type = pa.int64() if integers else pa.string()
        if pa.types.is_integer(self.id_type):
            wrong = next((i for i in ids if i is not None and not _is_integer(i) and str(i).strip() != str(_as_int(i))), None)
            if wrong is not None:
                raise DataError(f"--output {self.folder} holds integer ids, and this input has the id {wrong!r}: "
                                "write it to another --output, or give every input the same kind of id")
            return pa.array([None if i is None else _as_int(i) for i in ids], self.id_type)
        return pa.array([None if i is None else str(i) for i in ids], pa.string())

    def _write_part(self, frame, folder):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts += 1
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{self.parts:05d}.parquet"
        tmp = folder / f".{name}.tmp"
        table = pa.Table.from_pandas(frame.drop(columns="id"), preserve_index=False)
        table = table.add_column(0, "id", self._id_array([None if pd.isna(i) else i for i in frame["id"]]))
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, folder / name)

    def write(self, results, bad):
        for frame, folder, is_result in ((bad, self.bad_folder, False), (results, self.folder, True)):
            if len(frame):
                self._write_part(frame, folder)
                self.remember(frame, is_result)


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value):
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


class CsvSink(_IdsInMemory):
    """One CSV appended a chunk at a time (one write and fsync each); bad rows go to <stem>.bad.csv."""

    def __init__(self, path):
        self.path, self.bad_path = Path(path), Path(path).with_suffix(".bad.csv")
        if not self.path.parent.is_dir():
            raise DataError(f"--output {path}: the folder {self.path.parent} does not exist")
        if not os.access(self.path.parent, os.W_OK):  # its lock file and appended rows are written there
            raise DataError(f"--output {path}: the folder {self.path.parent} cannot be written (read-only, or not yours); "
                            "nothing was written")
        self.seen = {}
        self.name, self.lock_path = str(path), f"{path}.lock"
        for file, columns in ((self.path, RESULT_COLUMNS), (self.bad_path, BAD_COLUMNS)):
            _check_header(file, columns)

    def recover(self):
        """Under the lock: cut the half line a killed run may have left."""
        for file in (self.path, self.bad_path):
            _drop_unfinished_line(file)

    def load_digests(self, model):
        """(frame of id, text_digest and, for results, scored_at; is_result)."""
        for file, is_result in ((self.bad_path, False), (self.path, True)):
            if file.is_file() and file.stat().st_size:
                columns = ["id", "model", "text_digest", *(["scored_at"] if is_result else [])]
                for frame in pd.read_csv(file, usecols=columns, dtype=str, keep_default_na=False, chunksize=100_000):
                    yield frame[frame["model"] == model], is_result

    def write(self, results, bad):
        for frame, file, columns, is_result in ((bad, self.bad_path, BAD_COLUMNS, False), (results, self.path, RESULT_COLUMNS, True)):
            if not len(frame):
                continue
            new = not file.is_file() or file.stat().st_size == 0
            text = frame[columns].to_csv(index=False, header=new, lineterminator="\n")
            with open(file, "a", encoding="utf-8", newline="") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            self.remember(frame, is_result)


def _check_header(file, columns):
    """An existing output CSV is one score.py wrote (its header is ours), checked before anything in it is touched."""
    if not file.is_file() or file.stat().st_size == 0:
        return
    with open(file, "rb") as handle:
        first = handle.readline().rstrip(b"\r\n")
    if first == ",".join(column for column in columns if column != "text_digest").encode():
        raise DataError(f"--output {file}: written by an older score.py, which kept no text digests (so it cannot tell "
                        "edited rows); it is left as it is: choose another --output, or move it away to score everything anew")
    if first != ",".join(columns).encode():
        shown = first[:120].decode("utf-8", "replace")
        raise DataError(f"--output {file}: not a file score.py wrote (its first line is '{shown}', expected '{','.join(columns)}'); "
                        "it is left as it is: choose another --output")


def _drop_unfinished_line(file):
    """A run killed during a write may leave half a line at the end: cut it, so its rows are scored again."""
    if not file.is_file() or file.stat().st_size == 0:
        return
    with open(file, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 1))
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        keep = handle.read().rfind(b"\n") + 1
        handle.truncate(keep)
        print(f"{file}: removed an unfinished last line left by a killed run ({size - keep} bytes)", file=sys.stderr)


def open_source(cfg):
    if is_database(cfg.input):
        return TableSource(cfg.input, cfg.table, cfg.id_column, cfg.text_column, cfg.where)
    if cfg.where or cfg.table:
        raise DataError("--table and --where are for database inputs (a SQLAlchemy URL)")
    if is_remote_path(cfg.input) or is_remote_path(cfg.output):
        raise DataError(f"{cfg.input if is_remote_path(cfg.input) else cfg.output}: --engine local reads and writes local files; "
                        "use --engine spark for hdfs://, s3a:// and other cluster paths")
    return FileSource(cfg.input, cfg.id_column, cfg.text_column)


def open_sink(cfg, source):
    try:
        return _open_sink(cfg, source)
    except OSError as error:  # a read-only folder, say
        raise DataError(f"--output {cfg.output}: cannot be written ({error.strerror or error})") from None


def _check_not_inside_input(cfg, output):
    """An output inside an input folder would be read as input by the next run."""
    inputs = Path(cfg.input).resolve()
    if inputs.is_dir() and Path(output).resolve().is_relative_to(inputs):
        raise DataError(f"--output {output} lies inside the input folder {cfg.input}: the next run would read its results as "
                        "posts to score; write it elsewhere")


def _open_sink(cfg, source):
    output = cfg.output or (cfg.input if is_database(cfg.input) else "")
    if not output:
        raise DataError("--output is needed: a Parquet folder, a .csv file, or a SQLAlchemy URL")
    if is_database(output):
        table = cfg.output_table or (f"{cfg.table}_sentiment" if cfg.table else "")
        if not table:
            raise DataError(f"--output {safe_url(output)} is a database: name the table with --output-table")
        id_type = source.id_type_for_join() if isinstance(source, TableSource) and safe_url(output) == safe_url(cfg.input) else None
        return TableSink(output, table, id_type)
    _check_not_inside_input(cfg, output)
    if str(output).endswith(".csv"):
        return CsvSink(output)
    if Path(output).suffix in FILE_SUFFIXES:
        raise DataError(f"--output {output}: give a folder for Parquet parts (no suffix), a .csv file, or a database URL")
    return ParquetSink(output)


def split_chunk(chunk, sink, model):
    """(rows to score, bad rows, number skipped as already handled) of one chunk from a source."""
    problems, texts = [], chunk["text"].tolist()
    for identifier, text in zip(chunk["id"].tolist(), texts):
        if identifier is None or (not isinstance(identifier, str) and pd.isna(identifier)) or str(identifier).strip() == "":
            problems.append("missing id")
        elif text is None or (isinstance(text, float) and pd.isna(text)):
            problems.append("NULL text")
        else:
            problems.append(text_problem(text))
    chunk = chunk.assign(reason=problems, text_digest=[text_digest(text) for text in texts])
    duplicated = chunk["id"].duplicated() & chunk["reason"].isna()
    chunk.loc[duplicated, "reason"] = "duplicate id (an earlier row with this id is scored)"
    with_id = chunk["reason"] != "missing id"
    already = pd.Series(False, index=chunk.index)
    if with_id.any():
        latest, bad = sink.recorded(model, chunk.loc[with_id, "id"])
        already[with_id] = already_done(chunk.loc[with_id, "id"], chunk.loc[with_id, "text_digest"], latest, bad).to_numpy()
    bad = chunk[chunk["reason"].notna() & ~already]
    todo = chunk[chunk["reason"].isna() & ~already]
    return todo, bad, int(already.sum())


def score(cfg, load_classifier, model):
    """The local engine: read, skip, score and write chunk by chunk. Returns the summary counts. The classifier is
    loaded (load_classifier()) once the input is open, so a bad --input or --where is said before a model loads, and
    before the output is made, so a checkpoint that fails to load leaves no empty output behind."""
    source = open_source(cfg)
    loading = time.perf_counter()
    classifier = load_classifier()
    loaded = time.perf_counter()
    sink = open_sink(cfg, source)
    # a file output takes one writer at a time; a database output is safe by its transactions and primary key
    lock = FileLock(sink.lock_path, timeout=0) if sink.lock_path else nullcontext()
    counts = {"read": 0, "scored": 0, "skipped": 0, "bad": 0, "load_seconds": loaded - loading}
    try:
        with lock:
            if hasattr(sink, "recover"):
                sink.recover()
            with tqdm(total=source.count(), unit=" texts", desc="scoring", smoothing=0.1, dynamic_ncols=True) as bar:
                for chunk in source.chunks(cfg.chunk_rows):
                    todo, bad, skipped = split_chunk(chunk, sink, model)
                    results = score_rows(classifier, todo, model, cfg.batch_size)
                    failed = results["label"].isna()
                    if failed.any():  # texts the model could not take: bad rows, with the reason it gave
                        bad = pd.concat([bad, todo[failed.to_numpy()].assign(reason=results.loc[failed, "error"].to_numpy())])
                        results = results[~failed]
                    write_chunk(sink, results[RESULT_COLUMNS], bad_rows(bad, model))
                    counts["read"] += len(chunk)
                    counts["scored"] += len(results)
                    counts["skipped"] += skipped
                    counts["bad"] += len(bad)
                    bar.update(len(chunk))
                    bar.set_postfix(scored=counts["scored"], skipped=counts["skipped"], bad=counts["bad"])
    except Timeout:
        raise UserError(f"{sink.name} is being written by another score.py run (lock held); wait for it to finish") from None
    return counts


def write_chunk(sink, results, bad):
    """sink.write(), with a full disk or a read-only output said in one line: what earlier chunks wrote is kept, and a
    rerun goes on from there."""
    import sqlalchemy as sa

    kept = "the chunks written before are kept, and a rerun goes on from there"
    try:
        sink.write(results, bad)
    except OSError as error:
        raise DataError(f"--output {sink.name}: cannot write ({error.strerror or error}); {kept}") from None
    except sa.exc.DBAPIError as error:
        raise DataError(f"{sink.name}: cannot write ({database_message(error)}); {kept}") from None


def score_rows(classifier, todo, model, batch_size):
    """The per-batch scoring function of both engines: a DataFrame with id and text (each checked by split_chunk) ->
    RESULT_COLUMNS (+ error). All texts in one call, as arrays; if that call fails, text by text (predict_each), so one
    text the model cannot take costs the others nothing."""
    texts = todo["text"].tolist()
    try:
        probabilities = classifier.probabilities(texts, batch_size) if texts else np.zeros((0, 2), dtype=np.float32)
        labels = probabilities.argmax(axis=1)
        columns = {"label": labels, "sentiment": np.asarray(SENTIMENTS, dtype=object)[labels],
                   "confidence": probabilities.max(axis=1).astype(float), "prob_positive": probabilities[:, 1].astype(float),
                   "error": None}
    except Exception:
        results = classifier.predict_each(texts, batch_size)
        columns = {key: [r.get(key) for r in results] for key in ("label", "sentiment", "confidence", "prob_positive", "error")}
    frame = pd.DataFrame({
        "id": todo["id"].to_numpy(),
        "label": columns["label"],
        "sentiment": columns["sentiment"],
        "confidence": columns["confidence"],
        "prob_positive": columns["prob_positive"],
        "model": model,
        "scored_at": now(),
        "text_digest": todo["text_digest"].to_numpy(),
        "error": columns["error"],
    })
    frame["label"] = frame["label"].astype("Int64")
    return frame


def bad_rows(bad, model):
    return pd.DataFrame({
        "id": bad["id"].to_numpy(), "reason": bad["reason"].to_numpy(), "source": bad["source"].astype(str).to_numpy(),
        "row": bad["row"].astype("Int64").to_numpy() if len(bad) else [], "model": model, "seen_at": now(),
        "text_digest": bad["text_digest"].to_numpy(),
    })


def print_summary(counts, seconds, out=sys.stderr):
    rate = counts["scored"] / seconds if seconds else 0
    loading = counts.get("load_seconds")
    after_loading = (f" ({counts['scored'] / (seconds - loading):.1f} texts/s in the {seconds - loading:.1f} s after the model loaded)"
                     if loading is not None and seconds > loading else "")
    print(
        f"read {counts['read']:,}, scored {counts['scored']:,}, skipped as already scored {counts['skipped']:,}, "
        f"bad {counts['bad']:,} (in the side table or file, with the reason); {seconds:.1f} s, {rate:.1f} texts/s{after_loading}",
        file=out,
    )


# ---- the Spark engine: the same score_rows() inside mapInPandas, the model loaded once per Python worker

_WORKER_CLASSIFIERS = {}


def spark_partition_scorer(checkpoint, model, batch_size, runtime):
    """The function mapInPandas runs on every partition: bad rows keep their reason, the rest are scored."""

    def score_partition(frames):
        from .predict import Classifier

        key = (str(checkpoint), *sorted(runtime.items()))
        if key not in _WORKER_CLASSIFIERS:  # Python workers are reused across tasks, so this loads once per worker
            _WORKER_CLASSIFIERS[key] = Classifier.load(checkpoint, **runtime)
        classifier = _WORKER_CLASSIFIERS[key]
        for frame in frames:
            todo, bad, _ = split_chunk(frame.assign(source="spark", row=None), _NothingDone(), model)
            results = score_rows(classifier, todo, model, batch_size)
            failed = results["label"].isna()
            results["reason"] = results.pop("error").where(failed, None)
            out = pd.concat([
                results,
                pd.DataFrame({"id": bad["id"].to_numpy(), "model": model, "scored_at": now(), "text_digest": bad["text_digest"].to_numpy(),
                              "reason": bad["reason"].to_numpy()}),
            ], ignore_index=True)[[*RESULT_COLUMNS, "reason"]]
            # pandas 3's Arrow-backed strings reach PySpark as chunked arrays, which it cannot take: plain objects
            yield out.astype({column: object for column in out.columns if pd.api.types.is_string_dtype(out[column])})

    return score_partition


class _NothingDone:
    """On Spark the rows already scored are removed before mapInPandas, by an anti-join."""

    def recorded(self, model, ids):
        return {}, {}


JDBC_DRIVERS = {  # SQLAlchemy backend: (JDBC driver class, the jar a Debian / Ubuntu package installs, that package)
    "postgresql": ("org.postgresql.Driver", "/usr/share/java/postgresql.jar", "libpostgresql-jdbc-java"),
    "sqlite": ("org.sqlite.JDBC", "/usr/share/java/sqlite-jdbc.jar", "libxerial-sqlite-jdbc-java"),
    "mysql": ("com.mysql.cj.jdbc.Driver", None, "MySQL Connector/J"),
}


def jdbc_options(url):
    """A SQLAlchemy URL -> Spark's JDBC options: url, driver, user, password."""
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    backend = parsed.get_backend_name()
    if backend not in JDBC_DRIVERS:
        raise DataError(f"--engine spark reaches databases through JDBC: {', '.join(JDBC_DRIVERS)}, not {backend}")
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise DataError(f"{url}: --engine spark needs a SQLite file, not an in-memory database")
        return {"url": f"jdbc:sqlite:{Path(parsed.database).resolve()}", "driver": JDBC_DRIVERS[backend][0]}
    port = f":{parsed.port}" if parsed.port else ""
    options = {"url": f"jdbc:{backend}://{parsed.host or 'localhost'}{port}/{parsed.database}", "driver": JDBC_DRIVERS[backend][0]}
    if parsed.username:
        options["user"] = parsed.username
    if parsed.password:
        options["password"] = parsed.password
    return options


def jdbc_jars(jars, urls):
    """--spark-jars, or the driver jar the system package installs for each database in use; a clear error if none."""
    import sqlalchemy as sa

    if jars:
        return jars
    found = []
    for url in urls:
        _, jar, package = JDBC_DRIVERS.get(sa.make_url(url).get_backend_name(), (None, None, None))
        if jar and Path(jar).is_file():
            found.append(jar)
        elif package:
            hint = f"apt-get install {package}, or " if jar else ""
            raise DataError(f"{safe_url(url)}: --engine spark needs the JDBC driver jar ({hint}--spark-jars PATH.jar)")
    return ",".join(sorted(set(found)))


def sql_for(engine, query):
    """A SQLAlchemy query as SQL text in the database's dialect, for Spark's JDBC `query` option."""
    return str(query.compile(engine, compile_kwargs={"literal_binds": True}))


def score_spark(cfg, checkpoint, model):
    """--engine spark: Parquet / CSV / JSON files or a database table (JDBC) in; a Parquet folder or a database table
    out, with the same layout as the local engine's (part files and _bad_rows/; <table> and <table>_bad). Each run is
    two Spark writes (bad rows, then results). A Parquet write is all or nothing by Spark's commit protocol, a JDBC
    write is one transaction per partition, and the anti-join against the sink makes a rerun score only what is missing."""
    import pyspark.sql.functions as F
    import sqlalchemy as sa
    from pyspark.sql import SparkSession
    from pyspark.sql import types as T

    from . import REPO_ROOT

    output = cfg.output or (cfg.input if is_database(cfg.input) else "")
    if not output or (not is_database(output) and Path(str(output)).suffix):
        raise DataError("--engine spark writes a Parquet folder (--output FOLDER, no suffix) or a database table (--output URL)")
    if not is_database(cfg.input) and (cfg.where or cfg.table):
        raise DataError("--table and --where are for database inputs (a SQLAlchemy URL)")
    # checked on the driver, with the local engine's messages, before Spark starts
    source = TableSource(cfg.input, cfg.table, cfg.id_column, cfg.text_column, cfg.where) if is_database(cfg.input) else None
    jars = jdbc_jars(cfg.spark_jars, [url for url in (cfg.input, output) if is_database(url)])  # before any table is made
    sink = open_sink(cfg, source) if is_database(output) else None
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))  # local workers
    # the workers run this interpreter (a venv's, activated or not), not whatever python3 PATH finds first
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(cfg.master).appName("weibo-senti score.py")
        .config("spark.driver.memory", cfg.spark_memory).config("spark.executor.memory", cfg.spark_memory)
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.chunk_rows))
        .config("spark.ui.enabled", "false")
    )
    try:
        spark = (builder.config("spark.jars", jars) if jars else builder).getOrCreate()
    except Exception as error:  # no Java, a master that does not answer: nothing scored, so nothing left behind
        if sink is not None:
            sink.drop_created_if_empty()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot start Spark (--master {cfg.master}; it needs Java 17, JAVA_HOME or java on PATH): {reason}") from None
    spark.sparkContext.setLogLevel("ERROR")

    def read_jdbc(url, query):
        return spark.read.format("jdbc").options(**jdbc_options(url), query=query, fetchsize=str(cfg.chunk_rows)).load()

    if source is not None:
        query = sa.select(source.id.label("id"), source.text.label("text")).where(source.where)
        frame = read_jdbc(cfg.input, sql_for(source.engine, query))
    else:
        frame = read_files_spark(spark, cfg)
    read = frame.count()
    if not isinstance(frame.schema["text"].dataType, T.StringType):
        frame = frame.withColumn("text", F.col("text").cast("string"))
    frame = frame.withColumn(  # = text_digest()
        "text_digest", F.substring(F.sha2(F.coalesce(F.col("text"), F.lit(NULL_TEXT)), 256), 1, DIGEST_CHARS))
    recorded = recorded_spark(spark, sink, output, model, read_jdbc)
    if recorded is not None:
        # skip a row whose text is the one last scored for its id, or one already found bad (a NULL digest: written
        # before digests were kept, taken as the same text)
        recorded = recorded.withColumn("id", F.col("id").cast(frame.schema["id"].dataType))
        skip = (frame.select("id", "text_digest").join(recorded, on="id")
                .where(F.col("recorded_digest").isNull() | (F.col("recorded_digest") == F.col("text_digest"))).select("id"))
        frame = frame.join(skip.distinct(), on="id", how="left_anti")
    # Spread the rows to score evenly over every core, several tasks each: one JDBC connection reads a table into one
    # partition, a Parquet file written as one row group is one busy partition however Spark splits it, and adaptive
    # execution may merge what the anti-join leaves into a few
    frame = frame.repartition(4 * spark.sparkContext.defaultParallelism)
    if sink is not None and sink.ids_are_text:
        frame = frame.withColumn("id", F.col("id").cast("string"))
    schema = T.StructType([
        T.StructField("id", frame.schema["id"].dataType), T.StructField("label", T.LongType()),
        T.StructField("sentiment", T.StringType()), T.StructField("confidence", T.DoubleType()),
        T.StructField("prob_positive", T.DoubleType()), T.StructField("model", T.StringType()),
        T.StructField("scored_at", T.StringType()), T.StructField("text_digest", T.StringType()), T.StructField("reason", T.StringType()),
    ])
    # computed once, here (the results only, no texts): the writes below change the sink that the anti-join reads, so
    # nothing may be recomputed after them
    scored = frame.mapInPandas(spark_partition_scorer(checkpoint, model, cfg.batch_size, runtime_options(cfg)), schema).localCheckpoint()
    bad = scored.where(F.col("reason").isNotNull()).select(
        "id", "reason", F.lit(source.name if source is not None else str(cfg.input)).alias("source"),
        F.lit(None).cast("long").alias("row"), "model", F.col("scored_at").alias("seen_at"), "text_digest")
    good = scored.where(F.col("reason").isNull()).drop("reason")
    counts = {"read": read, "scored": good.count(), "bad": bad.count()}
    counts["skipped"] = read - counts["scored"] - counts["bad"]
    if sink is not None:
        # rows whose text changed: JDBC only appends, so their old results go first
        # rows now bad (a re-crawl blanked them): their old results go too, so no query returns a stale sentiment
        replaced = scored.select("id").join(recorded.where(F.col("is_result")).select("id"), "id", "left_semi").collect()
        sink.delete_results(model, [row.id for row in replaced])
        # SQLite takes one writer at a time: one partition writes it
        writers = {"numPartitions": "1"} if sink.engine.dialect.name == "sqlite" else {}
        for rows, table in ((bad, sink.bad.name), (good, sink.table.name)):
            rows.write.format("jdbc").options(**jdbc_options(output), dbtable=table, **writers).mode("append").save()
    else:
        bad.write.mode("append").parquet(f"{str(output).rstrip('/')}/_bad_rows")
        good.write.mode("append").parquet(str(output))
    spark.stop()
    return counts


def recorded_spark(spark, sink, output, model, read_jdbc):
    """What the output holds for this model: a DataFrame of (id, recorded_digest, is_result), the digest of each id's
    last result and every digest recorded as bad; None where there is nothing yet."""
    import functools

    import pyspark.sql.functions as F
    import sqlalchemy as sa
    from pyspark.errors import AnalysisException

    frames = []
    if sink is not None:
        for table, is_result in ((sink.table, True), (sink.bad, False)):
            query = sa.select(table.c.id, table.c.text_digest.label("recorded_digest")).where(table.c.model == model)
            frames.append(read_jdbc(output, sql_for(sink.engine, query)).withColumn("is_result", F.lit(is_result)))
        return functools.reduce(lambda a, b: a.unionByName(b), frames)
    for folder, is_result in ((str(output), True), (f"{str(output).rstrip('/')}/_bad_rows", False)):
        try:
            parts = spark.read.option("mergeSchema", "true").parquet(folder).where(F.col("model") == model)
        except AnalysisException:  # no such folder yet, or nothing in it
            continue
        if "text_digest" not in parts.columns:  # parts written before digests were kept
            parts = parts.withColumn("text_digest", F.lit(None).cast("string"))
        if is_result:  # a file output keeps every result: an id's last one is current
            parts = parts.groupBy("id").agg(F.max_by("text_digest", "scored_at").alias("recorded_digest"))
        else:
            parts = parts.select("id", F.col("text_digest").alias("recorded_digest"))
        frames.append(parts.withColumn("is_result", F.lit(is_result)))
    return functools.reduce(lambda a, b: a.unionByName(b), frames) if frames else None


def read_files_spark(spark, cfg):
    """Parquet, CSV or JSON-lines files (one kind per run) as a DataFrame of id and text."""
    import pyspark.sql.functions as F

    if is_remote_path(cfg.input):  # read by Spark itself; the kind from the name, Parquet if it has none
        files = [str(cfg.input)]
        kind = FILE_SUFFIXES.get(Path(str(cfg.input).rstrip("/*")).suffix, "parquet")
    else:
        files = [str(path) for path in FileSource(cfg.input, cfg.id_column, cfg.text_column).files]
        kinds = {FILE_SUFFIXES[Path(path).suffix] for path in files}
        if len(kinds) > 1:
            raise DataError(f"--input {cfg.input}: --engine spark reads one kind of file at a time, found {', '.join(sorted(kinds))}")
        kind = kinds.pop()
    reader = {"parquet": spark.read.parquet, "csv": lambda *p: spark.read.csv(list(p), header=True, multiLine=True),
              "jsonl": spark.read.json}[kind]
    frame = reader(*files)
    for option, column in (("--id-column", cfg.id_column), ("--text-column", cfg.text_column)):
        if column not in frame.columns:
            raise DataError(f"{cfg.input}: no column '{column}' ({option}); its columns: {', '.join(frame.columns)}")
    return frame.select(F.col(cfg.id_column).alias("id"), F.col(cfg.text_column).alias("text"))
