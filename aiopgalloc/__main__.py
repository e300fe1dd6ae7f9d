"""``python -m aiopgalloc`` (or the ``aiopgalloc`` console script): the demo,
host information, and the benchmarks.

    python -m aiopgalloc demo          # the main use case, end to end
    python -m aiopgalloc info          # what this host offers (pages, cgroups, pressure sources)
    python -m aiopgalloc info --json   # the same, as one JSON document
    python -m aiopgalloc bench         # side-by-side benchmarks against the usual alternatives
    python -m aiopgalloc --version     # the installed version

Each command lives in its own module under ``aiopgalloc._cli``, imported only
when chosen, so the library itself never imports the CLI's dependencies.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

from aiopgalloc import __version__

__all__ = ["main"]

_COMMANDS = {
    "demo": ("aiopgalloc._cli.demo", "run the cache demo: fill, load, memory pressure, shed"),
    "info": ("aiopgalloc._cli.info", "page sizes, THP, the memory cgroup, pressure sources"),
    "bench": ("aiopgalloc._cli.bench", "benchmarks side by side with the alternatives"),
}


def _prog() -> str:
    """How the user ran us: ``aiopgalloc`` (the console script) or
    ``python -m aiopgalloc``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "aiopgalloc" if name == "aiopgalloc" else "python -m aiopgalloc"


def _usage() -> str:
    prog = _prog()
    lines = [f"usage: {prog} {{" + ",".join(_COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["  --version print the version and exit"]
    lines += ["", f"{prog} COMMAND --help  for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line: dispatch to a command's ``main(argv)``.

    ``argv`` defaults to ``sys.argv[1:]``.  Returns the exit code: 0 for
    ``--help`` and ``--version``, 2 for no command or an unknown one (with
    the usage on stderr), else the command's own.  Imports only the chosen
    command's module.
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"aiopgalloc {__version__}")
        return 0
    entry = _COMMANDS.get(args[0])
    if entry is None:
        print(f"unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(entry[0])
    code: int = module.main(args[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
