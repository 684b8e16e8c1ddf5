"""Fused residual-VQ kernels.

Rows are the (batch, time) positions of ``x``; a row's element ``d`` lives at
``b * stride_xb + t * stride_xt + d * stride_xd``, so audiocraft's ``(B, D, T)`` layout and k-means'
``(N, D)`` samples (B=1, T=N) use the same kernel without a transpose.
"""
import triton
import triton.language as tl


@triton.jit
def _rvq_encode_kernel(
    x_ptr, cb_ptr, norm_ptr, codes_ptr, q_ptr, res_ptr,
    N, T, D, BINS, K,
    stride_xb, stride_xt, stride_xd,
    stride_cb, stride_ck, stride_ct,
    stride_rk,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WRITE_Q: tl.constexpr, WRITE_RES: tl.constexpr, STRAIGHT_THROUGH: tl.constexpr = False,
):
    """Nearest codeword of every layer for BLOCK_T rows; the residual stays in registers.

    x: rows of D floats (strides above); cb: (K, BINS, D) contiguous; norm: (K, BINS) = |e|^2;
    codes: (B, K, T) int64 via stride_c*; q: quantized sum with x's strides (if WRITE_Q);
    res: the input of layer k at ``k * stride_rk`` + x's offsets (if WRITE_RES).
    STRAIGHT_THROUGH: each layer's quantized value is audiocraft's training value ``r + (e - r)``, which
    is what the next residual subtracts and q sums (it can differ from ``e`` in the last bit).
    """
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T]
    m_n = o_n < N
    i_b = o_n // T
    i_t = o_n - i_b * T
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_x = (i_b * stride_xb + i_t * stride_xt)[:, None] + o_d[None, :].to(tl.int64) * stride_xd  # [BLOCK_T, BLOCK_D]
    m_x = m_n[:, None] & m_d[None, :]
    o_code = i_b * stride_cb + i_t * stride_ct  # [BLOCK_T]
    o_c = tl.arange(0, BLOCK_N)

    b_r = tl.load(x_ptr + o_x, mask=m_x, other=0.0)  # [BLOCK_T, BLOCK_D]
    b_q = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        k64 = tl.cast(k, tl.int64)
        if WRITE_RES:
            tl.store(res_ptr + k64 * stride_rk + o_x, b_r, mask=m_x)
        p_cb = cb_ptr + k64 * BINS * D
        p_norm = norm_ptr + k64 * BINS
        b_rn = tl.sum(b_r * b_r, axis=1)  # [BLOCK_T]
        b_best = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
        b_idx = tl.zeros([BLOCK_T], dtype=tl.int32)
        for n0 in range(0, BINS, BLOCK_N):
            o_e = n0 + o_c  # [BLOCK_N]
            m_e = o_e < BINS
            b_e = tl.load(
                p_cb + o_e.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_e[:, None] & m_d[None, :], other=0.0
            )  # [BLOCK_N, BLOCK_D]
            b_en = tl.load(p_norm + o_e, mask=m_e, other=0.0)  # [BLOCK_N]
            b_dot = tl.dot(b_r, tl.trans(b_e), input_precision="ieee")  # [BLOCK_T, BLOCK_N]
            # audiocraft's grouping: (|r|^2 - 2 r.e) + |e|^2
            b_dist = (b_rn[:, None] - 2.0 * b_dot) + b_en[None, :]
            # NaN and padded bins become +inf, so they can never win the strict '<' below
            b_dist = tl.where(m_e[None, :] & (b_dist < float("inf")), b_dist, float("inf"))
            b_tmin = tl.min(b_dist, axis=1)  # [BLOCK_T]
            b_tidx = tl.min(tl.where(b_dist == b_tmin[:, None], o_e[None, :], BINS), axis=1)  # first index in tile
            m_better = b_tmin < b_best  # strict: an equal distance in a later tile keeps the earlier index
            b_best = tl.where(m_better, b_tmin, b_best)
            b_idx = tl.where(m_better, b_tidx, b_idx)
        b_idx = tl.minimum(tl.maximum(b_idx, 0), BINS - 1)
        tl.store(codes_ptr + o_code + k64 * stride_ck, b_idx.to(tl.int64), mask=m_n)
        b_e = tl.load(p_cb + b_idx.to(tl.int64)[:, None] * D + o_d[None, :], mask=m_x, other=0.0)  # [BLOCK_T, BLOCK_D]
        if STRAIGHT_THROUGH:
            b_e = b_r + (b_e - b_r)
        b_r = b_r - b_e
        if WRITE_Q:
            b_q = b_q + b_e
    if WRITE_Q:
        tl.store(q_ptr + o_x, b_q, mask=m_x)


@triton.jit
def _rvq_decode_kernel(
    codes_ptr, cb_ptr, out_ptr,
    N, T, D, BINS, K,
    stride_cb, stride_ck, stride_ct,
    stride_ob, stride_ot, stride_od,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[b, :, t] = sum over k (in layer order) of cb[k, codes[b, k, t]]; grid (rows, D tiles).

    codes: (B, K, T) int64; cb: (K, BINS, D) contiguous; out: (B, D, T) via stride_o*.
    """
    i_n = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_n = i_n * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # [BLOCK_T]
    m_n = o_n < N
    i_b = o_n // T
    i_t = o_n - i_b * T
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_x = m_n[:, None] & m_d[None, :]
    o_code = i_b * stride_cb + i_t * stride_ct
    b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k in range(K):
        k64 = tl.cast(k, tl.int64)
        b_idx = tl.load(codes_ptr + o_code + k64 * stride_ck, mask=m_n, other=0)  # [BLOCK_T] int64
        # the op rejects out-of-range codes; the clamp only keeps a direct launch from reading out of bounds
        b_idx = tl.minimum(tl.maximum(b_idx, 0), BINS - 1)
        b_acc = b_acc + tl.load(cb_ptr + (k64 * BINS + b_idx)[:, None] * D + o_d[None, :], mask=m_x, other=0.0)
    o_out = (i_b * stride_ob + i_t * stride_ot)[:, None] + o_d[None, :].to(tl.int64) * stride_od
    tl.store(out_ptr + o_out, b_acc, mask=m_x)
