"""pytest-benchmark: the RVQ operations (encode, eval forward, train step, decode, k-means init)."""
OPS = ("rvq_encode", "rvq_forward", "rvq_train", "rvq_decode", "rvq_kmeans")


def test_rvq(run_bench, bench_case, provider, suite):
    run_bench(bench_case, provider, suite)
