"""The entry points pyproject.toml installs: the repository's own scripts, run as `python serve.py` runs them."""
import runpy
import sys

from . import REPO_ROOT


def _run(script):
    sys.argv[0] = script
    runpy.run_path(str(REPO_ROOT / script), run_name="__main__")


def serve():
    _run("serve.py")


def score():
    _run("score.py")
