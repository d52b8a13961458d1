"""The one exception type the command line turns into a one-line error and a non-zero exit, and the check
that refuses an unwritable output path before any work is done."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: the message names the argument and the value, and says what to do.

    ``field`` and ``value``, where given, say the same as data (the argument as a Python name, e.g.
    ``suppress_tokens``), so that the server can name the request's field without reading the message."""

    def __init__(self, message: str, *, field: str | None = None, value=None):
        super().__init__(message)
        self.field, self.value = field, value


def require_writable(flag: str, path: str | None, directory: bool = False) -> None:
    """Refuse, before any work is done, an output path that cannot be written: a missing or read-only
    parent folder, or a file where a folder is wanted (and the reverse)."""
    import os
    from pathlib import Path

    if path is None:
        return
    target = Path(path).expanduser()
    if target.exists() and target.is_dir() != directory:
        raise UsageError(f"{flag} {path!r} is {'a file' if directory else 'a directory'}; give a {'folder' if directory else 'file'} path.")
    probe = target if target.exists() else target.parent
    while directory and not probe.exists() and probe != probe.parent:  # a new folder: its nearest existing ancestor
        probe = probe.parent
    if not probe.exists():
        raise UsageError(f"{flag} {path!r}: the folder {str(probe)!r} does not exist.")
    if not probe.is_dir() and probe != target:
        raise UsageError(f"{flag} {path!r}: {str(probe)!r} is not a folder.")
    if not os.access(probe, os.W_OK):
        raise UsageError(f"{flag} {path!r} cannot be written (no write permission on {str(probe)!r}).")


def unknown_flag(parser, rest: list[str], prog: str) -> UsageError:
    """The one-line error of an unknown or misspelled flag: it, and the closest real flags."""
    import difflib

    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    bad = next((r for r in rest if r.startswith("-")), rest[0])
    close = difflib.get_close_matches(bad.split("=", 1)[0], flags, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; see `{prog} --help`."
    return UsageError(f"unknown argument {bad!r}" + hint, field=bad.lstrip("-").replace("-", "_"), value=bad)


def one_line_parser(**kwargs):
    """An ``argparse.ArgumentParser`` whose errors are a ``UsageError`` — one line naming the argument (the closest
    flags for a misspelled one) and exit 2, as every other command's — not a usage block and ``SystemExit``."""
    import argparse

    class OneLineParser(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            known, rest = self.parse_known_intermixed_args(args, namespace)
            if rest:
                raise unknown_flag(self, rest, self.prog)
            return known

        parse_intermixed_args = parse_args

        def error(self, message):
            raise UsageError(message)

    return OneLineParser(allow_abbrev=False, **kwargs)
