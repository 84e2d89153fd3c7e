"""Throwaway database servers on free loopback ports, for the tests that need a real PostgreSQL or MariaDB: started
from the system's server binaries (.ci/run installs them), their data in a temporary folder, removed when stopped."""
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_postgres():
    """(SQLAlchemy URL, stop) of a new PostgreSQL server, run as user postgres when we are root; (None, None) without one."""
    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    if not initdb[-1]:
        return None, None
    bin_dir = Path(initdb[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="weibo-senti-pg-"))
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(folder / "data"), "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-w", "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    stop = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast", "stop"]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", lambda: (subprocess.run(stop, capture_output=True), shutil.rmtree(folder, True))


def start_mariadb():
    """(SQLAlchemy URL of its database 'crawl', stop) of a new MariaDB server; (None, None) without one. No grant
    tables: any user may connect, which is all a throwaway server on loopback needs."""
    server, install = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", "")), shutil.which("mariadb-install-db")
    if not server or not install:
        return None, None
    folder = Path(tempfile.mkdtemp(prefix="weibo-senti-mariadb-"))
    user = ["--user=root"] if os.geteuid() == 0 else []
    subprocess.run([install, "--no-defaults", f"--datadir={folder / 'data'}", "--auth-root-authentication-method=normal",
                    "--skip-test-db", *user], check=True, capture_output=True)
    port = free_port()
    process = subprocess.Popen(
        [server, "--no-defaults", f"--datadir={folder / 'data'}", f"--port={port}", "--bind-address=127.0.0.1",
         f"--socket={folder / 'mysqld.sock'}", f"--pid-file={folder / 'mysqld.pid'}", "--skip-grant-tables", "--skip-name-resolve",
         f"--log-error={folder / 'error.log'}", *user],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    import sqlalchemy as sa

    deadline = time.monotonic() + 60
    while True:
        try:
            with sa.create_engine(f"mysql+pymysql://root@127.0.0.1:{port}/").begin() as connection:
                connection.execute(sa.text("CREATE DATABASE IF NOT EXISTS crawl CHARACTER SET utf8mb4"))
            break
        except sa.exc.OperationalError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (folder / "error.log").read_text(errors="replace")[-2000:] if (folder / "error.log").exists() else ""
                process.kill()
                raise RuntimeError(f"MariaDB did not start: {log}")
            time.sleep(0.2)

    def stop():
        process.terminate()
        process.wait(timeout=60)
        shutil.rmtree(folder, True)

    return f"mysql+pymysql://root@127.0.0.1:{port}/crawl", stop
