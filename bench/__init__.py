"""Load generator, workloads, model zoo and baselines."""
