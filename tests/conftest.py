import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network; set before huggingface_hub is imported

import runpy  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

import pytest  # noqa: E402

import databases  # noqa: E402
from databases import free_port  # noqa: E402
import tiny  # noqa: E402
from weibo_senti import REPO_ROOT, cli, training  # noqa: E402
TRAIN_SCRIPTS = {name: REPO_ROOT / name / "train.py" for name in ("adapter_tuning", "lora", "bert_lora")}
BASE_FAMILY = {"adapter_tuning": "gpt2", "lora": "gpt2", "bert_lora": "bert"}
# a learning rate at which the tiny random models learn the synthetic data in a few epochs
FAST = ["--lr", "1e-2", "--batch-size", "16"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"gpt2": tiny.make_gpt2(root / "gpt2"), "bert": tiny.make_bert(root / "bert")}


@pytest.fixture(scope="session")
def weibo_csv(tmp_path_factory):
    return tiny.write_csv(tmp_path_factory.mktemp("data") / "weibo.csv", tiny.synthetic_rows(400))


def script_config(method, argv):
    """The train.py constants of `method`, overridden by argv exactly as on the command line."""
    script_globals = runpy.run_path(str(TRAIN_SCRIPTS[method]), run_name="imported_by_tests")
    return cli.parse_config(script_globals, argv)


def train(method, model, data, output_dir, *extra):
    """A training run on `data`; without weibo2018's posts (HUMAN_DATA) unless `extra` names a --human-data file."""
    human = [] if "--human-data" in extra else ["--human-data", "none"]
    argv = ["--model", str(model), "--data", str(data), "--output-dir", str(output_dir), *FAST, *human, *extra]
    return training.run(script_config(method, argv), method)


@pytest.fixture(scope="session")
def trained(tiny_models, weibo_csv, tmp_path_factory):
    """One short training run per method, shared by the tests that only read its checkpoint."""
    runs = {}

    def get(method):
        if method not in runs:
            output_dir = tmp_path_factory.mktemp(method)
            log = train(method, tiny_models[BASE_FAMILY[method]], weibo_csv, output_dir, "--epochs", "4")
            runs[method] = (output_dir, log)
        return runs[method]

    return get


@pytest.fixture
def classifier(trained):
    """The classifier of the short adapter_tuning run."""
    from weibo_senti.predict import Classifier

    return Classifier.load(trained("adapter_tuning")[0] / "best")


def run_script(path, *args, stdin=None, cwd=REPO_ROOT, env_extra=None):
    return subprocess.run(
        [sys.executable, str(path), *map(str, args)], input=stdin, capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, **(env_extra or {})},
    )


@contextlib.contextmanager
def read_only(folder):
    """Make `folder`, with what it holds, a folder nobody may write into: by its mode for a normal user; for root, whom
    modes do not stop, a read-only bind mount (skipped where root may not mount)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("root cannot make a read-only bind mount here, and modes do not stop root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty folder nobody may write into."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    with read_only(folder):
        yield folder


class Server:
    def __init__(self, *args, port=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "serve.py"), "--port", str(self.port), "--log-level", "warning", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not get ready within 120 s")

    def post(self, body=None, **options):
        return httpx.post(self.url + "/api/sentiment", json=body, timeout=60, **options)

    def metric(self, name):
        lines = httpx.get(self.url + "/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{"))

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _database(variable, start, name, package):
    """A database for the session: the URL in $variable, or a throwaway server started for it (tests/databases.py)."""
    if os.environ.get(variable):
        yield os.environ[variable]
        return
    url, stop = start()
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"no {name} server: .ci/run installs one (apt-get install {package})")
        pytest.skip(f"no {name} server here (apt-get install {package})")
    yield url
    stop()


@pytest.fixture(scope="session")
def postgres_url():
    yield from _database("WEIBO_SENTI_TEST_POSTGRES", databases.start_postgres, "PostgreSQL", "postgresql")


@pytest.fixture(scope="session")
def mariadb_url():
    yield from _database("WEIBO_SENTI_TEST_MYSQL", databases.start_mariadb, "MariaDB", "mariadb-server")
