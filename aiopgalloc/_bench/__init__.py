"""The benchmark suite behind ``python -m aiopgalloc bench``.

One module per workload; each measures aiopgalloc side by side with what a
user would pick instead, in one process, with the contenders' repetitions
interleaved (their order rotated every round) and medians reported:

1. ``churn``       allocate / write / free against mmap, shared_memory, a
                   hand-written first-fit free list and pyarrow
2. ``scaling``     allocate + dec_ref cost from 1k to 1M live segments
3. ``release``     freeing 1 GiB of 4 KiB pages until the kernel holds none,
                   against the bare punch-hole calls
4. ``usage_scan``  ``update_usage()`` against the bare mincore walk
5. ``eviction``    pressure notification or ``start_evictions()`` to the
                   first ``evict()`` call
6. ``memory``      Python heap bytes per live segment (tracemalloc)
7. ``commit``      ``allocate(commit=...)`` modes against first-touch faults
8. ``checkpoint``  save / load throughput (informational)
9. ``reuse``       recycling freed pages against release + refault
10. ``storm``      a kernel pressure source (cgroup v1 eventfd): signal to
                   ``evict()``, and event-loop lag under a storm of events
11. ``segment_set`` SegmentSet operations alone, against a linear-scan
                   first fit (the reference's)
12. ``tight_loop`` allocate + dec_ref (4 KiB; 16 KiB written) with no await,
                   10,000 live, against mmap and shared_memory, on the
                   compiled and the pure build side by side

``aiopgalloc._cli.bench`` parses the command line and runs them;
``common`` holds the configuration, the result types, the machine
description and the helpers every workload shares; ``report`` prints the
table, writes the JSON and draws the PNG.  Nothing here is imported by the
library itself.  ``benchmarks/profile_hot_paths.py`` profiles workloads 1
and 3 with these modules; ``benchmarks/results/`` keeps committed results.
"""
