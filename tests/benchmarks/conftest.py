"""The benchmarks are scripts run by hand (see docs/benchmarks.md), never collected as tests."""

collect_ignore_glob = ["*"]
