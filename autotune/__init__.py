"""Tuning tooling for the GPU (``python -m autotune``); the tables it writes live in per-GPU folders here."""
