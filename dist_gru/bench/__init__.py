"""Measurements, apart from the package's working code: `dist-gru bench` (training throughput
against an independent loop, and `--inference`), the shape sweep, and the memory bound of window
datasets. Nothing in dist_gru outside this package imports it."""
