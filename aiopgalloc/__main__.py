"""``python -m aiopgalloc``: the demo, host information, and the benchmarks.

    python -m aiopgalloc demo     # the main use case, end to end
    python -m aiopgalloc info     # what this host offers (pages, cgroups, pressure sources)
    python -m aiopgalloc bench    # side-by-side benchmarks against the usual alternatives

Each command lives in its own module under ``aiopgalloc._cli``, imported only
when chosen, so the library itself never imports the CLI's dependencies.
"""

from __future__ import annotations

import sys
from importlib import import_module

_COMMANDS = {
    "demo": ("aiopgalloc._cli.demo", "run the cache demo: fill, load, memory pressure, shed"),
    "info": ("aiopgalloc._cli.info", "page sizes, THP, the memory cgroup, pressure sources"),
    "bench": ("aiopgalloc._cli.bench", "benchmarks side by side with the alternatives"),
}


def _usage() -> str:
    lines = ["usage: python -m aiopgalloc {" + ",".join(_COMMANDS) + "} [options]", ""]
    lines += [f"  {name:<7}{help_}" for name, (_, help_) in _COMMANDS.items()]
    lines += ["", "python -m aiopgalloc COMMAND --help  for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's ``main(argv)``; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    entry = _COMMANDS.get(args[0])
    if entry is None:
        print(f"unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(entry[0])
    code: int = module.main(args[1:])
    return code


if __name__ == "__main__":
    sys.exit(main())
