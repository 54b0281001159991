"""Triton kernels of LSSA / LSSAR (DESIGN.md section 2): forward, backward preprocess, dq and dk/dv.

Imported lazily by `triton_attention` on first use: `@triton.jit` reads TRITON_INTERPRET when this module is
imported, so setting it any time before the first call selects the CPU interpreter.

Layout per (batch, head): q (Nq, D), k, v (Nk, D) with the last dim contiguous; query i sits at absolute position
Q_OFFSET + i and attends keys DOC_START[pos] <= j <= pos (DOC_START = 0 without packing), n_i = pos - start + 1.
QK-norm is applied on the fly: s_ij = (q_i . k_j) * rq_i * rk_j with the inverse norms rq, rk precomputed, and its
backward is the epilogue of the dq and dk kernels. Row statistics (fp32, (NSTAT, B, H, Nq)):
0: 1/W (1/Z for LSSA and flat LSSAR rows), 1: t, 2: 1/m (0 marks a flat row or LSSA), 3: G = sum_j (g/m)^(p-1).
Flat LSSAR row (n_i > 3 and m_i = 0): detected as max_j f = min_j f (exactly flat, whatever the rounding of Z / n)
or max f <= t (rounding); it falls back to the stage-1 weights f / Z, forward and backward (DESIGN.md section 2).
Every tile is either unmasked (strictly inside the causal triangle, no packing) or masked (MASKED=True).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes and offsets vary from call to call: not specialised on (== 1, % 16), so one build serves every length.
_RUNTIME_INTS = ["H", "N_Q", "N_K", "Q_OFFSET", "STAT_STRIDE", "TUNE_NQ", "TUNE_NK"]


@triton.jit
def _softplus(x):
    """Stable softplus with tl.exp / tl.log only (libdevice is not available in the interpreter)."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _softplus_sigmoid(x):
    """softplus(x) and sigmoid(x) sharing one exp(-|x|) (the backward needs both)."""
    e = tl.exp(-tl.abs(x))
    one_plus = 1.0 + e
    return tl.maximum(x, 0.0) + tl.log(one_plus), tl.where(x >= 0, 1.0, e) / one_plus


@triton.jit
def _rows(offs_m, Q_OFFSET, N_Q, DOC_START, LOG_D, PACKED: tl.constexpr):
    """Absolute positions, document starts, row lengths n_i and length scales c_i = ln(d) ln(n_i) of query rows."""
    pos = Q_OFFSET + offs_m
    if PACKED:  # noqa: SIM108 (jit code: a static if, not a ternary)
        start = tl.load(DOC_START + pos, mask=offs_m < N_Q, other=0)
    else:
        start = tl.zeros_like(pos)
    n = (pos - start + 1).to(tl.float32)
    return pos, start, n, LOG_D * tl.log(n)


@triton.jit
def _visible(offs_n, pos, start, PACKED: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key offs_n[j] is in row i's causal window (and document)."""
    valid = offs_n[None, :] <= pos[:, None]
    if PACKED:
        valid = valid & (offs_n[None, :] >= start[:, None])
    return valid


@triton.jit
def _pow_pm1(r, P):
    """r^(p-1) for r in [0, 1], exactly 0 where r = 0 (the ReLU's zero gradient, also for p = 1)."""
    positive = r > 0
    return tl.where(positive, tl.exp2((P - 1.0) * tl.log2(tl.where(positive, r, 1.0))), 0.0)


@triton.jit
def _load_rows(PTR, offs, stride, n_rows, HEAD_DIM: tl.constexpr):
    """Rows offs (< n_rows, zeros past it) of a (rows, HEAD_DIM) matrix with row stride `stride`."""
    return tl.load(PTR + offs[:, None] * stride + tl.arange(0, HEAD_DIM)[None, :], mask=(offs < n_rows)[:, None],
                   other=0.0)  # fmt: skip


@triton.jit
def _scores(q, cq, k, rk, PRECISION: tl.constexpr):
    """x_ij = c_i s_ij = c_i (q_i . k_j) / (||q_i|| ||k_j||) for a (BLOCK_M, BLOCK_N) tile (cq = c * rq)."""
    return tl.dot(q, tl.trans(k), input_precision=PRECISION) * cq[:, None] * rk[None, :]


@triton.jit
def _fwd_sweep(
    acc, z, fmax, fmin, u, g_sum, q, cq, pos, start, t, inv_m, flat, K, V, RK,
    lo, hi, stride_kn, stride_vn, N_K, P,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PASS: tl.constexpr, MASKED: tl.constexpr,
    PACKED: tl.constexpr, STORE_UG: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One sweep over key tiles [lo, hi). PASS 0: LSSA (acc += f v, z += f). PASS 1: LSSAR statistics
    (z, max f, min f). PASS 2: LSSAR weights w = (g/m)^p (f on flat rows): acc += w v, z += w, and U, G."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, N_K, HEAD_DIM)
        rk = tl.load(RK + offs_n, mask=offs_n < N_K, other=0.0)
        f = _softplus(_scores(q, cq, k, rk, PRECISION))
        f_or_inf = f
        if MASKED:
            valid = _visible(offs_n, pos, start, PACKED)
            f = tl.where(valid, f, 0.0)
            f_or_inf = tl.where(valid, f, float("inf"))
        if PASS == 1:
            z += tl.sum(f, 1)
            fmax = tl.maximum(fmax, tl.max(f, 1))
            fmin = tl.minimum(fmin, tl.min(f_or_inf, 1))
        else:
            v = _load_rows(V, offs_n, stride_vn, N_K, HEAD_DIM)
            w = f
            if PASS == 2:
                r = tl.maximum(f - t[:, None], 0.0) * inv_m[:, None]
                rp1 = _pow_pm1(r, P)
                w = tl.where(flat[:, None], f, rp1 * r)
                if STORE_UG:
                    u += tl.dot(rp1.to(v.dtype), v, input_precision=PRECISION)
                    g_sum += tl.sum(rp1, 1)
            acc += tl.dot(w.to(v.dtype), v, input_precision=PRECISION)
            z += tl.sum(w, 1)
    return acc, z, fmax, fmin, u, g_sum


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_kernel(
    Q, K, V, OUT, RQ, RK, STATS, U, DOC_START,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
    H, N_Q, N_K, Q_OFFSET, STAT_STRIDE, LOG_D, P, TUNE_NQ, TUNE_NK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REWEIGHT: tl.constexpr,
    PACKED: tl.constexpr, STORE_UG: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Forward of one block of query rows: LSSA in one sweep, LSSAR in two (statistics, then weights)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh
    row0 = pid_bh.to(tl.int64) * N_Q
    RK += pid_bh.to(tl.int64) * N_K

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = _load_rows(Q, offs_m, stride_qm, N_Q, HEAD_DIM)
    pos, start, n, c = _rows(offs_m, Q_OFFSET, N_Q, DOC_START, LOG_D, PACKED)
    cq = c * tl.load(RQ + row0 + offs_m, mask=row_ok, other=0.0)

    hi = Q_OFFSET + tl.minimum(m0 + BLOCK_M, N_Q)
    if PACKED:
        lo = tl.load(DOC_START + Q_OFFSET + m0) // BLOCK_N * BLOCK_N
        full = lo
    else:
        lo = 0
        full = (Q_OFFSET + m0 + 1) // BLOCK_N * BLOCK_N

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    inv_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    fmax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    fmin = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    flat = fmax == fmax
    u = acc
    g_sum = z
    if REWEIGHT:
        acc, z, fmax, fmin, u, g_sum = _fwd_sweep(
            acc, z, fmax, fmin, u, g_sum, q, cq, pos, start, t, inv_m, flat, K, V, RK, lo, full,
            stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, 1, False, PACKED, STORE_UG, PRECISION,
        )  # fmt: skip
        acc, z, fmax, fmin, u, g_sum = _fwd_sweep(
            acc, z, fmax, fmin, u, g_sum, q, cq, pos, start, t, inv_m, flat, K, V, RK, full, hi,
            stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, 1, True, PACKED, STORE_UG, PRECISION,
        )  # fmt: skip
        long_row = n > 3.0
        t = tl.where(long_row, z / n, 0.0)
        m = fmax - t
        flat = long_row & ((fmax <= fmin) | (m <= 0.0))
        inv_m = tl.where(flat, 0.0, 1.0 / tl.where(flat, 1.0, m))
        z = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sweep = 2 if REWEIGHT else 0
    acc, z, fmax, fmin, u, g_sum = _fwd_sweep(
        acc, z, fmax, fmin, u, g_sum, q, cq, pos, start, t, inv_m, flat, K, V, RK, lo, full,
        stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, sweep, False, PACKED, STORE_UG, PRECISION,
    )  # fmt: skip
    acc, z, fmax, fmin, u, g_sum = _fwd_sweep(
        acc, z, fmax, fmin, u, g_sum, q, cq, pos, start, t, inv_m, flat, K, V, RK, full, hi,
        stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, sweep, True, PACKED, STORE_UG, PRECISION,
    )  # fmt: skip

    inv_w = 1.0 / z
    out = acc * inv_w[:, None]
    tl.store(OUT + offs_m[:, None] * stride_om + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(STATS + row0 + offs_m, inv_w, mask=row_ok)
    if REWEIGHT:
        tl.store(STATS + STAT_STRIDE + row0 + offs_m, t, mask=row_ok)
        tl.store(STATS + 2 * STAT_STRIDE + row0 + offs_m, inv_m, mask=row_ok)
        if STORE_UG:
            tl.store(STATS + 3 * STAT_STRIDE + row0 + offs_m, g_sum, mask=row_ok)
            u_ptrs = U + row0 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
            tl.store(u_ptrs, u, mask=row_ok[:, None])


@triton.jit
def _bwd_preprocess(
    OUT, DO, RQ, STATS, U, DELTA, DOC_START,
    stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
    H, N_Q, Q_OFFSET, STAT_STRIDE, LOG_D, P,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, REWEIGHT: tl.constexpr, PACKED: tl.constexpr,
):  # fmt: skip
    """Per row, into DELTA: 0: D_i = dO_i . O_i, 1: LSSAR's beta_i = o_i H_i / n_i with
    H_i = p (dO.U - D G) / (W m), 2: c_i / ||q_i|| (the dk kernel's only other per-row factor)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    OUT += b * stride_ob + h * stride_oh
    DO += b * stride_db + h * stride_dh
    row0 = pid_bh.to(tl.int64) * N_Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    o = _load_rows(OUT, offs_m, stride_om, N_Q, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, offs_m, stride_dm, N_Q, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + row0 + offs_m, delta, mask=row_ok)
    _, _, n, c = _rows(offs_m, Q_OFFSET, N_Q, DOC_START, LOG_D, PACKED)
    cq = c * tl.load(RQ + row0 + offs_m, mask=row_ok, other=0.0)
    tl.store(DELTA + 2 * STAT_STRIDE + row0 + offs_m, cq, mask=row_ok)
    if REWEIGHT:
        u_ptrs = U + row0 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        u = tl.load(u_ptrs, mask=row_ok[:, None], other=0.0)
        inv_w = tl.load(STATS + row0 + offs_m, mask=row_ok, other=0.0)
        inv_m = tl.load(STATS + 2 * STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
        g_sum = tl.load(STATS + 3 * STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
        big_h = P * (tl.sum(do * u, 1) - delta * g_sum) * inv_w * inv_m
        beta = tl.where(n > 3.0, big_h / n, 0.0)
        tl.store(DELTA + STAT_STRIDE + row0 + offs_m, beta, mask=row_ok)


@triton.jit
def _grad_tile(f, sig, dp, delta, inv_w, t, inv_m, beta, P, REWEIGHT: tl.constexpr):
    """Weights A and dL/dx = dL/df * sigmoid(x) of a tile (row statistics broadcast-shaped, rows on either axis).

    f = softplus(x), sig = sigmoid(x). LSSA and flat LSSAR rows: A = f/Z, dL/df = (dP - D)/Z. LSSAR: A = w/W,
    dL/df = p (g/m)^(p-1) (dP - D) / (W m) - o H / n (beta). The caller applies dS = dL/dx * c.
    """
    if REWEIGHT:
        flat = inv_m == 0.0
        r = tl.maximum(f - t, 0.0) * inv_m
        rp1 = _pow_pm1(r, P)
        a = tl.where(flat, f, rp1 * r) * inv_w
        df = tl.where(flat, 1.0, P * inv_m * rp1) * inv_w * (dp - delta) - beta
    else:
        a = f * inv_w
        df = (dp - delta) * inv_w
    return a, df * sig


@triton.jit
def _row_stats(STATS, DELTA, row0, offs_m, row_ok, STAT_STRIDE, REWEIGHT: tl.constexpr):
    """1/W, t, 1/m, D and beta of query rows (t, 1/m, beta are 0 for LSSA), from the forward and preprocess."""
    inv_w = tl.load(STATS + row0 + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row0 + offs_m, mask=row_ok, other=0.0)
    t = tl.zeros_like(inv_w)
    inv_m = t
    beta = t
    if REWEIGHT:
        t = tl.load(STATS + STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
        inv_m = tl.load(STATS + 2 * STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
        beta = tl.load(DELTA + STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
    return inv_w, t, inv_m, delta, beta


@triton.jit
def _dq_sweep(
    dq, q, do, cq, pos, start, inv_w, t, inv_m, delta, beta, K, V, RK,
    lo, hi, stride_kn, stride_vn, N_K, P,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, REWEIGHT: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq^ / c_i += sum_j dL/dx_ij k^_j over key tiles [lo, hi) for one block of query rows."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(K, offs_n, stride_kn, N_K, HEAD_DIM)
        v = _load_rows(V, offs_n, stride_vn, N_K, HEAD_DIM)
        rk = tl.load(RK + offs_n, mask=offs_n < N_K, other=0.0)
        f, sig = _softplus_sigmoid(_scores(q, cq, k, rk, PRECISION))
        if MASKED:
            valid = _visible(offs_n, pos, start, PACKED)
            f = tl.where(valid, f, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        _, dx = _grad_tile(
            f, sig, dp, delta[:, None], inv_w[:, None], t[:, None], inv_m[:, None], beta[:, None], P, REWEIGHT
        )
        if MASKED:
            dx = tl.where(valid, dx, 0.0)
        dq += tl.dot((dx * rk[None, :]).to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, RQ, RK, STATS, DELTA, DOC_START,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    H, N_Q, N_K, Q_OFFSET, STAT_STRIDE, LOG_D, P, TUNE_NQ, TUNE_NK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REWEIGHT: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of one block of query rows (keys swept as in the forward), then back through the l2 QK-norm."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_db + h * stride_dh
    row0 = pid_bh.to(tl.int64) * N_Q
    RK += pid_bh.to(tl.int64) * N_K

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N_Q
    q = _load_rows(Q, offs_m, stride_qm, N_Q, HEAD_DIM)
    do = _load_rows(DO, offs_m, stride_dm, N_Q, HEAD_DIM)
    pos, start, n, c = _rows(offs_m, Q_OFFSET, N_Q, DOC_START, LOG_D, PACKED)
    rq = tl.load(RQ + row0 + offs_m, mask=row_ok, other=0.0)
    inv_w, t, inv_m, delta, beta = _row_stats(STATS, DELTA, row0, offs_m, row_ok, STAT_STRIDE, REWEIGHT)

    hi = Q_OFFSET + tl.minimum(m0 + BLOCK_M, N_Q)
    if PACKED:
        lo = tl.load(DOC_START + Q_OFFSET + m0) // BLOCK_N * BLOCK_N
        full = lo
    else:
        lo = 0
        full = (Q_OFFSET + m0 + 1) // BLOCK_N * BLOCK_N
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_sweep(
        dq, q, do, c * rq, pos, start, inv_w, t, inv_m, delta, beta, K, V, RK, lo, full,
        stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, False, REWEIGHT, PACKED, PRECISION,
    )  # fmt: skip
    dq = _dq_sweep(
        dq, q, do, c * rq, pos, start, inv_w, t, inv_m, delta, beta, K, V, RK, full, hi,
        stride_kn, stride_vn, N_K, P, HEAD_DIM, BLOCK_N, True, REWEIGHT, PACKED, PRECISION,
    )  # fmt: skip

    q_hat = q.to(tl.float32) * rq[:, None]
    dq = dq * c[:, None]
    dq = rq[:, None] * (dq - q_hat * tl.sum(dq * q_hat, 1)[:, None])
    tl.store(DQ + row0 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


@triton.jit
def _dkdv_sweep(
    dk, dv, k, v, rk, offs_n, Q, DO, STATS, DELTA, DOC_START, row0,
    lo, hi, stride_qm, stride_dm, N_Q, Q_OFFSET, STAT_STRIDE, P,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, REWEIGHT: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dv += A^T dO and dk^ += dS^T q^ over query tiles [lo, hi), in the transposed (keys x queries) layout.

    Per query row only c_i/||q_i||, D_i, 1/W_i (and LSSAR's t_i, 1/m_i, beta_i) are live: row vectors are
    replicated across the threads of a column, so each one costs registers."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N_Q
        q = _load_rows(Q, offs_m, stride_qm, N_Q, HEAD_DIM)
        do = _load_rows(DO, offs_m, stride_dm, N_Q, HEAD_DIM)
        cq = tl.load(DELTA + 2 * STAT_STRIDE + row0 + offs_m, mask=row_ok, other=0.0)
        inv_w, t, inv_m, delta, beta = _row_stats(STATS, DELTA, row0, offs_m, row_ok, STAT_STRIDE, REWEIGHT)
        f, sig = _softplus_sigmoid(tl.dot(k, tl.trans(q), input_precision=PRECISION) * rk[:, None] * cq[None, :])
        if MASKED:
            valid = offs_n[:, None] <= (Q_OFFSET + offs_m)[None, :]
            if PACKED:
                start = tl.load(DOC_START + Q_OFFSET + offs_m, mask=row_ok, other=0)
                valid = valid & (offs_n[:, None] >= start[None, :])
            f = tl.where(valid, f, 0.0)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        a, dx = _grad_tile(
            f, sig, dp, delta[None, :], inv_w[None, :], t[None, :], inv_m[None, :], beta[None, :], P, REWEIGHT
        )
        if MASKED:
            dx = tl.where(valid, dx, 0.0)
        dv += tl.dot(a.to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot((dx * cq[None, :]).to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, RK, STATS, DELTA, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dm,
    H, N_Q, N_K, Q_OFFSET, STAT_STRIDE, LOG_D, P, TUNE_NQ, TUNE_NK,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REWEIGHT: tl.constexpr,
    PACKED: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of one block of keys, sweeping the query rows that see it; dk back through the l2 QK-norm."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_db + h * stride_dh
    row0 = pid_bh.to(tl.int64) * N_Q
    krow0 = pid_bh.to(tl.int64) * N_K

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K, offs_n, stride_kn, N_K, HEAD_DIM)
    v = _load_rows(V, offs_n, stride_vn, N_K, HEAD_DIM)
    rk = tl.load(RK + krow0 + offs_n, mask=offs_n < N_K, other=0.0)
    offs_d = tl.arange(0, HEAD_DIM)

    # rows see key j from position j on: first row Q_OFFSET + i >= n0; all keys of the tile once i >= n0 + BLOCK_N - 1
    lo = tl.maximum(n0 - Q_OFFSET, 0) // BLOCK_M * BLOCK_M
    if PACKED:
        last_key = tl.minimum(n0 + BLOCK_N, N_K) - 1
        hi = tl.minimum(tl.load(DOC_END + last_key) - Q_OFFSET, N_Q)
        mid = hi
    else:
        hi = N_Q
        mid = tl.minimum((tl.maximum(n0 + BLOCK_N - 1 - Q_OFFSET, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
        mid = tl.maximum(mid, lo)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dk, dv = _dkdv_sweep(
        dk, dv, k, v, rk, offs_n, Q, DO, STATS, DELTA, DOC_START, row0, lo, mid, stride_qm, stride_dm,
        N_Q, Q_OFFSET, STAT_STRIDE, P, HEAD_DIM, BLOCK_M, True, REWEIGHT, PACKED, PRECISION,
    )  # fmt: skip
    dk, dv = _dkdv_sweep(
        dk, dv, k, v, rk, offs_n, Q, DO, STATS, DELTA, DOC_START, row0, mid, hi, stride_qm, stride_dm,
        N_Q, Q_OFFSET, STAT_STRIDE, P, HEAD_DIM, BLOCK_M, False, REWEIGHT, PACKED, PRECISION,
    )  # fmt: skip

    key_ok = offs_n < N_K
    out = krow0 * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])  # first: frees dv's registers
    k_hat = k.to(tl.float32) * rk[:, None]
    dk = rk[:, None] * (dk - k_hat * tl.sum(dk * k_hat, 1)[:, None])
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
