"""Shared code of the three Weibo sentiment methods: data, models, training loop, checkpoints, console."""
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
# a clone (or pip install -e): the repository around the package; an installed copy: what it carries of it (pyproject.toml)
REPO_ROOT = _PACKAGE.parent if (_PACKAGE.parent / "models" / "classifiers").is_dir() else _PACKAGE / "repo"
FINE_TUNING_DEFAULTS_FILE = "fine_tuning.json"  # in a base model folder: settings measured best on it, per method


def repo_relative(path):
    """`path` relative to the repository when it lies inside, so a checkpoint that names it works in any clone."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(resolved)


class UserError(Exception):
    """A problem the user can fix (bad data, missing model, bad checkpoint); shown as a message, not a traceback."""
