"""Issue 47: the package installs as BettaFish's operators install everything else. A wheel (what pip install git+...
builds) and an editable install, each in a virtual environment that sees this machine's packages (torch and the rest)
and nothing of the clone: the entry points score, the analyzer loads the shipped default, the package finds its models."""
import subprocess
import sys
import venv

import pytest

from weibo_senti import REPO_ROOT


def _venv(folder):
    """A virtual environment, and the pip command that installs into it (this interpreter's pip and setuptools, since
    the one ensurepip seeds is too old to build this project without the network)."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(folder)
    return folder / "bin", [sys.executable, "-m", "pip", "--python", str(folder / "bin" / "python"), "install", "--no-deps"]


def _run(command, cwd, **options):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900, **options)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO_ROOT)], cwd=out)
    return next(out.glob("weibo_senti-*.whl"))


def test_an_installed_wheel_scores_with_the_shipped_default_and_serves_bettafish_anywhere(wheel, tmp_path):
    bin_dir, pip_install = _venv(tmp_path / "env")
    _run([*pip_install, "--no-index", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "posts.csv").write_text("id,content\n1,今天真开心，谢谢大家\n2,又加班到半夜，心好累\n", encoding="utf-8")
    scored = _run([bin_dir / "weibo-senti-score", "--input", "posts.csv", "--output", "scored.csv", "--backend", "torch"], cwd=elsewhere)
    assert "model adapter_tuning@" in scored.stderr and (elsewhere / "scored.csv").is_file()
    lines = (elsewhere / "scored.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and ",正面," in lines[1] and ",负面," in lines[2]
    analyzer = _run([bin_dir / "python", "-c", (
        "import weibo_senti; from weibo_senti.bettafish import WeiboSentimentAnalyzer as A; a = A(mixed_precision='no'); "
        "assert a.initialize(), a.disable_reason; print(weibo_senti.REPO_ROOT); print(a.analyze_single_text('又加班到半夜，心好累').sentiment_label)")],
        cwd=elsewhere)
    root, label = analyzer.stdout.split()
    assert "site-packages" in root and str(REPO_ROOT) not in root and label in ("负面", "非常负面")
    assert "--max-text-chars" in _run([bin_dir / "weibo-senti-serve", "--help"], cwd=elsewhere).stdout


def test_an_editable_install_is_the_clone(tmp_path):
    bin_dir, pip_install = _venv(tmp_path / "env")
    _run([*pip_install, "--no-build-isolation", "-e", str(REPO_ROOT)], cwd=tmp_path)
    found = _run([bin_dir / "python", "-c", "import weibo_senti; print(weibo_senti.REPO_ROOT)"], cwd=tmp_path)
    assert found.stdout.strip() == str(REPO_ROOT)
    assert "--max-text-chars" in _run([bin_dir / "weibo-senti-serve", "--help"], cwd=tmp_path).stdout
