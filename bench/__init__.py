"""Benchmarks of fastcodec (``fastcodec bench`` and ``pytest bench/``): ``harness`` times, ``cases`` defines what
(its builders: ``build_rvq``, ``build_seanet``, on ``case_base``)."""
