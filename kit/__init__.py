"""The kit the tests and the benchmarks share: real workload processes (workload.py), the
one daemon runner (daemon_runner.py), the kernel THP knobs saved and restored under the
machine lock, and the checks of pagemap, kpageflags and smaps written apart from the product
code (helpers.py), memory cgroups (cgroups.py), and the real applications (redis_app.py,
pg.py). A package of its own: `bench/` imports it, never `tests`. Nothing here imports
hugepaged, so that what is checked is what the kernel says."""
