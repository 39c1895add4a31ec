"""hugepaged's tests, a package so that the benchmarks import the same kit (`tests.helpers`,
`tests.daemon_runner`) the tests use."""
