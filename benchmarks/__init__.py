"""Benchmarks: every implementation and its anchors under one timer."""
