"""Benchmarks: speed, memory, quality. They print figures; they never assert times."""
