"""Measurements, apart from the package's working code: `dist-gru bench` (training throughput
against an independent loop, and `--inference`), the shape sweep, the memory bound of window
datasets, and `prepare --table` on a generated table. Nothing in dist_gru outside this package
imports it."""
