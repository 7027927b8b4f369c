"""Shared helpers for HeadSeg's tests and benchmarks (tiny seeded models, checkpoints, workflow tools)."""
