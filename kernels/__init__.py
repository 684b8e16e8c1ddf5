"""Triton kernels (``fastcodec.kernels``): raw tensors and shapes in, no torch.nn.

``rvq.py``: fused residual-VQ encode/decode; ``ema.py``: deterministic codebook EMA and k-means
updates. Launchers (grid, block sizes, checks) live with the op registration in ``fastcodec/ops``.
Import these modules only after ``TRITON_INTERPRET`` has its final value: ``triton.jit`` reads it
when the kernels are decorated.
"""
