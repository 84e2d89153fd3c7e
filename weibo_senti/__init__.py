"""Shared code of the three Weibo sentiment methods: data, models, training loop, checkpoints, console."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """A problem the user can fix (bad data, missing model, bad checkpoint); shown as a message, not a traceback."""
