"""pytest-benchmark: SEANet encoder/decoder offline, streaming chunks, and the whole codec."""
OPS = ("seanet_encoder", "seanet_decoder", "seanet_streaming", "codec")


def test_seanet(run_bench, bench_case, provider, suite):
    run_bench(bench_case, provider, suite)
