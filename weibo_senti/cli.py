"""Turn the UPPER_CASE constants at the top of a script into command-line flags (nanoGPT style).

MAX_LENGTH = 128  # comment      ->  --max-length 128, help text 'comment'
CHECKPOINT = []  # comment       ->  --checkpoint A --checkpoint B (a list constant makes a repeatable flag)

A relative Path constant is relative to the repository (so a script works from any folder);
a relative path typed on the command line is relative to where you are, as usual.
"""
import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace


from . import REPO_ROOT, UserError

_CONSTANT_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=.*?(?:#\s*(.*))?$")


def _help_texts(script_path):
    texts = {}
    for line in Path(script_path).read_text(encoding="utf-8").splitlines():
        match = _CONSTANT_LINE.match(line)
        if match and match.group(2):
            texts[match.group(1)] = match.group(2).strip()
    return texts


def as_flags(settings):
    """{"lora_r": 16, "lr": 0.001} -> "--lora-r 16, --lr 0.001": settings written as the flags that set them."""
    return ", ".join(f"--{name.replace('_', '-')} {value}" for name, value in settings.items())


def parse_config(script_globals, argv=None, positional=None):
    """Return the script's constants, overridden by any --flags, as a namespace with lower_case names; its `given`
    is the set of names set on the command line (the rest are the script's constants).

    positional: optional (name, help) of a list of positional arguments, e.g. the checkpoints compare.py takes."""
    constants = {
        name: value
        for name, value in script_globals.items()
        if name.isupper() and isinstance(value, (bool, int, float, str, Path, list))
    }
    helps = _help_texts(script_globals["__file__"])
    parser = argparse.ArgumentParser(
        description=(script_globals.get("__doc__") or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # so that `given` sees every flag by its full name
    )
    for name, default in constants.items():
        flag = "--" + name.lower().replace("_", "-")
        if isinstance(default, Path) and not default.is_absolute():
            default = REPO_ROOT / default
        kwargs = {"default": default, "help": helps.get(name, " ")}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            kwargs.update(action="append", default=None, metavar=name)
        else:
            kwargs["type"] = Path if isinstance(default, Path) else type(default)
            kwargs["metavar"] = name
        parser.add_argument(flag, dest=name.lower(), **kwargs)
    if positional:
        parser.add_argument(positional[0], nargs="*", type=Path, help=positional[1])
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = SimpleNamespace(**vars(parser.parse_args(argv)))
    for name, default in constants.items():
        if isinstance(default, list) and getattr(cfg, name.lower()) is None:
            setattr(cfg, name.lower(), list(default))
    cfg.given = {
        action.dest
        for action in parser._actions
        for flag in action.option_strings
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv)
    }
    return cfg


def check_ranges(cfg, ranges):
    """Stop before any work on a setting out of its range. ranges: {name: (test, what is allowed)}; a name the namespace
    lacks is passed over, so one table serves scripts with different settings."""
    for name, (allowed, description) in ranges.items():
        if hasattr(cfg, name) and not allowed(getattr(cfg, name)):
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, name)} ({name.upper()}): out of range, must be {description}")


def main(function):
    """Run a script's work; a UserError ends it with its message instead of a traceback."""
    try:
        function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
