"""Everything that talks to Linux.

Modules here perform system calls and read kernel files; they hold no
allocator state and never import from the package above them.  The allocator
(``aiopgalloc.memory_file``) decides; this layer performs.
"""
