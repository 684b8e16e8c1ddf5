"""Deterministic codebook updates: EMA (training) and the k-means mean step.

The host sorts each layer's codes with a stable sort, so ``perm[k, starts[k, c]:starts[k, c + 1]]``
lists, in ascending row order, the rows assigned to code ``c``. Each program owns a block of codes
and sums their rows itself in a fixed order: no atomics, the same bits on every run, and the bits do
not depend on how many codes a program owns.
With HAS_ERR, a non-zero ``err[0]`` (an asynchronous input check failed, fastcodec/_devcheck.py) makes
the EMA kernels leave every buffer untouched, so bad input never reaches the codebooks.
A row ``n`` of ``src`` is ``b = n // T, t = n % T`` at ``b * stride_b + t * stride_t + d * stride_d``.
"""
import triton
import triton.language as tl


@triton.jit
def _pair_sum(x, S0: tl.constexpr, S1: tl.constexpr, H: tl.constexpr):
    """[S0, S1, 2*H] -> [S0, S1, H]: element i is x[..., 2i] + x[..., 2i+1]."""
    a, b = tl.split(tl.reshape(x, [S0, S1, H, 2]))
    return a + b


@triton.jit
def _segment_sums(
    p_src, p_perm, b_start, b_end, T, stride_b, stride_t, stride_d, o_d, m_d,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row sums of BLOCK_C segments ``perm[start:end]`` -> [BLOCK_C, BLOCK_D].

    Lane j of a segment adds its rows j, j+16, j+32, ... in order; the 16 lanes are then added in a
    fixed pairwise tree (not tl.sum, whose order follows the layout), so the bits depend on neither
    BLOCK_C nor num_warps.
    """
    tl.static_assert(BLOCK_R == 16)
    b_acc = tl.zeros([BLOCK_C, BLOCK_R, BLOCK_D], dtype=tl.float32)
    o_r = tl.arange(0, BLOCK_R)
    max_len = tl.max(b_end - b_start, axis=0)
    for r0 in range(0, max_len, BLOCK_R):
        o_row = b_start[:, None] + r0 + o_r[None, :]  # [BLOCK_C, BLOCK_R] positions in perm
        m_row = o_row < b_end[:, None]
        b_n = tl.load(p_perm + o_row, mask=m_row, other=0)  # [BLOCK_C, BLOCK_R] int64 row ids
        i_b = b_n // T
        i_t = b_n - i_b * T
        o_src = (i_b * stride_b + i_t * stride_t)[:, :, None] + o_d[None, None, :].to(tl.int64) * stride_d
        b_acc += tl.load(p_src + o_src, mask=m_row[:, :, None] & m_d[None, None, :], other=0.0)
    b_lanes = tl.permute(b_acc, (0, 2, 1))  # [BLOCK_C, BLOCK_D, 16]
    b_lanes = _pair_sum(b_lanes, BLOCK_C, BLOCK_D, 8)
    b_lanes = _pair_sum(b_lanes, BLOCK_C, BLOCK_D, 4)
    b_lanes = _pair_sum(b_lanes, BLOCK_C, BLOCK_D, 2)
    return _pair_sum(b_lanes, BLOCK_C, BLOCK_D, 1).reshape(BLOCK_C, BLOCK_D)


@triton.jit
def _ema_update_kernel(
    res_ptr, perm_ptr, starts_ptr, cs_ptr, ea_ptr,
    N, T, D, BINS,
    stride_rk, stride_rb, stride_rt, stride_rd,
    decay, one_minus_decay, err_ptr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ERR: tl.constexpr = False,
):
    """cluster_size and embed_avg EMA for codes [i_c*BLOCK_C, +BLOCK_C) of layer i_k; grid (code blocks, K).

    res: (K, B, D, T) via stride_r*; perm: (K, N) int64; starts: (K, BINS + 1) int64;
    cs: (K, BINS); ea: (K, BINS, D), both updated in place.
    """
    i_c = tl.program_id(0)
    i_k = tl.program_id(1).to(tl.int64)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < BINS
    if HAS_ERR:
        m_c = m_c & (tl.load(err_ptr + o_c * 0) == 0)  # [BLOCK_C]: the word, broadcast
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_starts = starts_ptr + i_k * (BINS + 1)
    b_start = tl.load(p_starts + o_c, mask=m_c, other=0)  # [BLOCK_C] int64
    b_end = tl.load(p_starts + o_c + 1, mask=m_c, other=0)
    b_sum = _segment_sums(res_ptr + i_k * stride_rk, perm_ptr + i_k * N, b_start, b_end, T,
                          stride_rb, stride_rt, stride_rd, o_d, m_d, BLOCK_C, BLOCK_R, BLOCK_D)
    b_cnt = (b_end - b_start).to(tl.float32)
    o_kc = i_k * BINS + o_c  # [BLOCK_C]
    b_cs = tl.load(cs_ptr + o_kc, mask=m_c, other=0.0)
    # torch's mul_(decay).add_(x, alpha=1-decay) is one rounding for the product and one fma
    tl.store(cs_ptr + o_kc, tl.fma(b_cnt, one_minus_decay, b_cs * decay), mask=m_c)
    o_e = o_kc[:, None] * D + o_d[None, :]  # [BLOCK_C, BLOCK_D]
    m_e = m_c[:, None] & m_d[None, :]
    b_ea = tl.load(ea_ptr + o_e, mask=m_e, other=0.0)
    tl.store(ea_ptr + o_e, tl.fma(b_sum, one_minus_decay, b_ea * decay), mask=m_e)


@triton.jit
def _ema_normalize_kernel(
    cs_ptr, ea_ptr, embed_ptr,
    BINS, D,
    epsilon, bins_epsilon, err_ptr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, HAS_ERR: tl.constexpr = False,
):
    """embed = embed_avg / Laplace-smoothed cluster_size for a block of codes; grid (code blocks, K).

    cs: (K, BINS) (already updated); ea, embed: (K, BINS, D). Every program of a layer sums that
    layer's cluster sizes itself, in the same fixed order, so they all use the same n.
    """
    i_c = tl.program_id(0)
    i_k = tl.program_id(1).to(tl.int64)
    p_cs = cs_ptr + i_k * BINS
    o_b = tl.arange(0, BLOCK_B)
    b_n = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, BINS, BLOCK_B):
        b_n += tl.load(p_cs + b0 + o_b, mask=b0 + o_b < BINS, other=0.0)
    n = tl.sum(b_n, axis=0)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < BINS
    if HAS_ERR:
        m_c = m_c & (tl.load(err_ptr + o_c * 0) == 0)  # [BLOCK_C]: the word, broadcast
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_cs = tl.load(p_cs + o_c, mask=m_c, other=0.0)  # [BLOCK_C]
    # reference order: (cs + eps) / (n + bins*eps) * n; div_rn because '/' is not correctly rounded on GPUs
    b_sm = tl.math.div_rn(b_cs + epsilon, tl.zeros_like(b_cs) + (n + bins_epsilon)) * n
    o_e = (i_k * BINS + o_c)[:, None] * D + o_d[None, :]  # [BLOCK_C, BLOCK_D]
    m_e = m_c[:, None] & m_d[None, :]
    b_ea = tl.load(ea_ptr + o_e, mask=m_e, other=0.0)
    b_den = tl.where(m_e, tl.zeros_like(b_ea) + b_sm[:, None], 1.0)
    tl.store(embed_ptr + o_e, tl.math.div_rn(b_ea, b_den), mask=m_e)


@triton.jit
def _kmeans_update_kernel(
    src_ptr, perm_ptr, starts_ptr, means_ptr,
    T, D, BINS,
    stride_b, stride_t, stride_d,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Lloyd mean step for a block of clusters: mean = sum of its samples / count, kept if empty.

    src: samples (rows via stride_*); perm: (N,) int64; starts: (BINS + 1,) int64; means: (BINS, D) in place.
    """
    i_c = tl.program_id(0)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < BINS
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_start = tl.load(starts_ptr + o_c, mask=m_c, other=0)
    b_end = tl.load(starts_ptr + o_c + 1, mask=m_c, other=0)
    b_sum = _segment_sums(src_ptr, perm_ptr, b_start, b_end, T, stride_b, stride_t, stride_d, o_d, m_d,
                          BLOCK_C, BLOCK_R, BLOCK_D)  # [BLOCK_C, BLOCK_D]
    b_cnt = b_end - b_start
    o_e = o_c.to(tl.int64)[:, None] * D + o_d[None, :]
    m_e = m_c[:, None] & m_d[None, :]
    b_old = tl.load(means_ptr + o_e, mask=m_e, other=0.0)
    b_den = tl.zeros_like(b_sum) + tl.maximum(b_cnt, 1).to(tl.float32)[:, None]
    tl.store(means_ptr + o_e, tl.where(b_cnt[:, None] > 0, tl.math.div_rn(b_sum, b_den), b_old), mask=m_e)
