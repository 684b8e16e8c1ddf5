"""Benchmarks of fastcodec (``fastcodec bench`` and ``pytest bench/``): ``harness`` times, ``cases`` defines what."""
