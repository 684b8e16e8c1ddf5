"""Before/after timing of the fast SEANet for an A/B between two checkouts (run this file with each on PYTHONPATH,
alternating processes): the cases the full SEANet suite did not reach within its budget for issue #14's
before/after (24 kHz decoders, 32 kHz and 48 kHz encoder and decoder), fastcodec only, 2 threads, median of 5
calls (3 at B8) after a warm-up; the checksum shows the outputs are the same.

    PYTHONPATH=CHECKOUT python bench/plan_ab.py > result.json
"""
import json
import statistics
import time
import warnings

import torch

CASES = [("24k", "decoder", 1, 1.0), ("24k", "decoder", 1, 10.0), ("24k", "decoder", 8, 10.0),
         ("32k", "encoder", 1, 10.0), ("32k", "decoder", 1, 10.0), ("48k", "encoder", 1, 10.0), ("48k", "decoder", 1, 10.0)]


def main() -> int:
    import fastcodec
    from fastcodec.bench.cases import SEANET_CONFIGS
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    out = {"fastcodec": fastcodec.__file__}
    for cfg, kind, B, sec in CASES:
        kw, sr = SEANET_CONFIGS[cfg]["kwargs"], SEANET_CONFIGS[cfg]["sample_rate"]
        torch.manual_seed(0)
        m = (fastcodec.SEANetEncoder if kind == "encoder" else fastcodec.SEANetDecoder)(**kw).eval()
        hop = 1
        for r in kw["ratios"]:
            hop *= r
        g = torch.Generator().manual_seed(1)
        x = (0.1 * torch.randn(B, kw["channels"], int(sec * sr), generator=g) if kind == "encoder"
             else torch.randn(B, kw["dimension"], int(sec * sr) // hop, generator=g))
        reps = 3 if B == 8 else 5
        with torch.inference_mode():
            y = m(x)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                m(x)
                ts.append((time.perf_counter() - t) * 1e3)
        out[f"{cfg}-{kind}-B{B}-{sec:g}s"] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts),
                                              "checksum": float(y.double().sum())}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
