"""The command line: one module per ``python -m aiopgalloc`` command."""
