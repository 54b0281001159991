// Memory-efficient LSSA / LSSAR attention for the CPU (DESIGN.md section 2), forward and backward.
//
// Inputs are already QK-normalised (q^, k^) by the caller; layout (B, H, N, D) with any strides as long as the
// last dimension is contiguous. Each query row i attends the keys [lo_i, hi_i] (causal, KV-cache offset, packed
// documents or no mask), n_i = hi_i - lo_i + 1; fp32 or fp64 (the caller computes bf16/fp16 in fp32).
//
// Work is split into tasks of one block of query rows (forward) or one (batch, head) (backward), handed to torch's
// threads dynamically. A task walks its keys in tiles: S = Q^ K^T by BLAS, one fused vectorised pass over the tile
// while it is in cache (softplus, masking, re-weighting, row sums), then the tile's products by BLAS. Nothing larger
// than block rows x Nk (linear in N) is ever held:
// - forward, LSSA: one pass, O = sum_tiles f V / Z;
// - forward, LSSAR: pass 1 keeps the block's f in a block-rows x Nk panel and reduces Z_i and max_j f_ij; pass 2
//   re-weights the panel in place with the max-normalised w = (ReLU(f - t) / m)^p (it never overflows) and
//   accumulates O = w V / W, U_i = sum_j u^(p-1) v_j and G_i = sum_j u^(p-1) for the one-pass backward. Keeping f
//   spares pass 2 the recomputation of S and softplus;
// - backward (FlashAttention-2 style, recomputing the tiles): A and dS per tile, then dV += A^T dO,
//   dQ^ += dS K^ and dK^ += dS^T Q^, with LSSAR's row sums H_i from U_i and G_i.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*);
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // present when the BLAS is MKL (x86 torch wheels)
}

namespace {

using at::vec::Vectorized;

// Single-threaded BLAS for the scope: the kernel parallelises over tiles itself, and MKL's own threads cost
// more than they save on tile-sized GEMMs (and would oversubscribe the cores inside the parallel region).
struct SerialBlas {
  int previous = 0;
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);
  }
};

// Row-major C[m x n] = alpha op(A) op(B) + beta C, through the column-major BLAS that ships inside libtorch.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int mi = n, ni = m, ki = k, la = ldb, lb = lda, lc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  } else {
    dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
  }
}

// u^e for u in [0, 1]: repeated squaring for integer exponents (p = 15 costs 6 multiplies), exp(e log u) otherwise.
template <typename T>
struct Power {
  double e;
  bool integer;
  explicit Power(double exponent) : e(exponent), integer(exponent == std::floor(exponent) && exponent <= 64) {}

  Vectorized<T> operator()(Vectorized<T> u) const {
    if (integer) {
      Vectorized<T> result(T(1)), base = u;
      for (int64_t n = static_cast<int64_t>(e); n; n >>= 1) {
        if (n & 1) result = result * base;
        base = base * base;
      }
      return result;
    }
    return (u.log() * Vectorized<T>(T(e))).exp();  // log(0) = -inf -> exp(-inf) = 0
  }
  T operator()(T u) const { return std::pow(u, T(e)); }
};

// Per-row geometry and the LSSAR per-row constants shared by forward and backward.
struct Geometry {
  std::vector<int64_t> lo, hi;  // key range [lo_i, hi_i] of each query row
  double log_d;
  int64_t n(int64_t i) const { return hi[i] - lo[i] + 1; }
  double c(int64_t i) const { return log_d * std::log(static_cast<double>(n(i))); }
};

Geometry make_geometry(int64_t n_q, int64_t n_k, int64_t d, bool causal, int64_t q_offset,
                       const at::Tensor& cu_seqlens) {
  Geometry g{std::vector<int64_t>(n_q), std::vector<int64_t>(n_q), std::log(static_cast<double>(d))};
  if (cu_seqlens.numel() > 0) {
    auto cu = cu_seqlens.to(at::kLong).contiguous();
    const int64_t* starts = cu.data_ptr<int64_t>();
    const int64_t docs = cu.numel() - 1;
    TORCH_CHECK(n_q == n_k && starts[0] == 0 && starts[docs] == n_k, "cu_seqlens must run from 0 to N = Nq = Nk");
    for (int64_t j = 0; j < docs; ++j) TORCH_CHECK(starts[j] < starts[j + 1], "cu_seqlens must rise strictly");
    int64_t doc = 0;
    for (int64_t i = 0; i < n_q; ++i) {
      while (starts[doc + 1] <= i) ++doc;
      g.lo[i] = starts[doc];
      g.hi[i] = i;
    }
    return g;
  }
  TORCH_CHECK(!causal || (0 <= q_offset && q_offset + n_q <= n_k), "q_offset must lie in [0, Nk - Nq]");
  TORCH_CHECK(causal || n_k > 0, "every query needs at least one key");
  for (int64_t i = 0; i < n_q; ++i) {
    g.lo[i] = 0;
    g.hi[i] = causal ? q_offset + i : n_k - 1;
  }
  return g;
}

// Strided view of one (batch, head) slice: row i starts at ptr + i * ld.
template <typename T>
struct Slice {
  T* ptr;
  int64_t ld;
  T* row(int64_t i) const { return ptr + i * ld; }
};

template <typename T>
Slice<T> slice(const at::Tensor& x, int64_t b, int64_t h) {
  return {x.data_ptr<T>() + b * x.stride(0) + h * x.stride(1), x.stride(2)};
}

// The visible part [a, e) of key tile [k0, k1) for row i, both in [0, k1 - k0] (empty when a >= e).
inline std::pair<int64_t, int64_t> visible(const Geometry& g, int64_t i, int64_t k0, int64_t k1) {
  const int64_t a = std::clamp(g.lo[i], k0, k1) - k0, e = std::clamp(g.hi[i] + 1, k0, k1) - k0;
  return {a, std::max(a, e)};
}

template <typename T>
inline void zero_outside(T* row, int64_t a, int64_t e, int64_t len) {
  std::fill(row, row + a, T(0));
  std::fill(row + e, row + len, T(0));
}

// log1p(e) for e in [0, 1] in fp32: 2 atanh(y), y = e / (2 + e) in [0, 1/3], odd series to y^15 (relative error
// below 1e-8, no cancellation for small e). A third of the cost of Sleef's general log1p, the hottest call here.
inline Vectorized<float> log1p_unit(Vectorized<float> e) {
  using Vec = Vectorized<float>;
  const Vec y = e / (Vec(2.f) + e), y2 = y * y;
  Vec series(1.f / 15.f);
  for (const float coef : {1.f / 13.f, 1.f / 11.f, 1.f / 9.f, 1.f / 7.f, 1.f / 5.f, 1.f / 3.f, 1.f}) {
    series = at::vec::fmadd(series, y2, Vec(coef));
  }
  return Vec(2.f) * y * series;
}
inline Vectorized<double> log1p_unit(Vectorized<double> e) { return e.log1p(); }

// softplus(x) and exp(-|x|) (sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e)), vector and scalar.
template <typename T>
inline Vectorized<T> softplus(Vectorized<T> x, Vectorized<T>& e) {
  e = x.abs().neg().exp();
  return at::vec::maximum(x, Vectorized<T>(T(0))) + log1p_unit(e);
}
template <typename T>
inline T softplus(T x, T& e) {
  e = std::exp(-std::abs(x));
  return std::max(x, T(0)) + std::log1p(e);
}
template <typename T>
inline Vectorized<T> sigmoid_from(Vectorized<T> x, Vectorized<T> e) {
  const Vectorized<T> one(T(1));
  return Vectorized<T>::blendv(e, one, x >= Vectorized<T>(T(0))) / (one + e);
}
template <typename T>
inline T sigmoid_from(T x, T e) {
  return (x >= T(0) ? T(1) : e) / (T(1) + e);
}

// Horizontal sum / max of a vector (Vectorized<double> has no reduce_add on every ISA).
template <typename T>
inline T hsum(Vectorized<T> x) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return a + b; }, x);
}
template <typename T>
inline T hmax(Vectorized<T> x) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T> a, Vectorized<T> b) { return at::vec::maximum(a, b); }, x);
}

// Small problems (below ~1M multiply-adds) run on the calling thread: waking the thread pool costs more.
inline bool is_small(const at::Tensor& q, const at::Tensor& k) { return q.numel() * k.size(2) < (int64_t(1) << 20); }

// Calls worker(next) on each of torch's intra-op threads; next() hands out the task ids 0..tasks-1 one at a time
// (-1 when none are left). Dynamic, not static chunks: on a shared machine a preempted thread does not hold the
// whole op back, and causal tasks of unequal cost balance themselves.
template <typename Worker>
void run_tasks(int64_t tasks, bool serial, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  const auto next = [&] {
    const int64_t task = counter.fetch_add(1, std::memory_order_relaxed);
    return task < tasks ? task : int64_t(-1);
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  if (serial || threads <= 1 || at::in_parallel_region()) {
    worker(next);
    return;
  }
#pragma omp parallel num_threads(threads)
  worker(next);
}

template <typename T>
constexpr T kFlatTolerance = T(64) * std::numeric_limits<T>::epsilon();

// Row statistics saved by the forward for the backward, per query row.
enum Stat : int64_t { kZ = 0, kT = 1, kM = 2, kW = 3, kG = 4, kStats = 5 };

struct Blocks {
  int64_t q, k;
};

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool reweight, double p,
                  const Geometry& geo, at::Tensor& out, at::Tensor& stats, at::Tensor& u_out, bool save_u,
                  Blocks blocks) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t batch = q.size(0), heads = q.size(1), n_q = q.size(2), d = q.size(3);
  const int64_t n_blocks = (n_q + blocks.q - 1) / blocks.q;
  const Power<T> pow_p1(p - 1.0);

  run_tasks(batch * heads * n_blocks, is_small(q, k), [&](const auto& next) {
    // LSSAR keeps the block's f (then its weights) for all its keys between the passes: rows x Nk, linear in N.
    // LSSA needs one tile of it. u^(p-1) for LSSAR's U goes to a tile-sized buffer.
    std::vector<T> panel(blocks.q * (reweight ? k.size(2) : blocks.k)), tile_u(save_u ? blocks.q * blocks.k : 0);
    std::vector<T> acc(blocks.q * d), acc_u(save_u ? blocks.q * d : 0);
    std::vector<T> z(blocks.q), fmax(blocks.q), t(blocks.q), m(blocks.q), w_sum(blocks.q), g_sum(blocks.q);
    for (int64_t task; (task = next()) >= 0;) {
      // Last (most expensive, causal) blocks first, so the dynamic schedule ends with cheap tasks.
      const int64_t bh = task / n_blocks, blk = n_blocks - 1 - task % n_blocks;
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t r0 = blk * blocks.q, rows = std::min(blocks.q, n_q - r0);
      const auto qs = slice<T>(q, b, h), ks = slice<T>(k, b, h), vs = slice<T>(v, b, h);
      int64_t k_begin = geo.lo[r0], k_end = geo.hi[r0] + 1;
      for (int64_t r = 0; r < rows; ++r) {
        k_begin = std::min(k_begin, geo.lo[r0 + r]);
        k_end = std::max(k_end, geo.hi[r0 + r] + 1);
      }
      const int64_t width = reweight ? k_end - k_begin : blocks.k;  // the panel's row stride
      std::fill(z.begin(), z.end(), T(0));
      std::fill(fmax.begin(), fmax.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(acc_u.begin(), acc_u.end(), T(0));

      // Pass 1, tile by tile while it is in cache: S = Q^ K^T, f = softplus(c s) in place (0 where masked),
      // Z_i and max_j f_ij; LSSA's output accumulates right away (O = f V / Z).
      for (int64_t k0 = k_begin; k0 < k_end; k0 += blocks.k) {
        const int64_t k1 = std::min(k0 + blocks.k, k_end), len = k1 - k0;
        T* tile = panel.data() + (reweight ? k0 - k_begin : 0);
        gemm<T>(false, true, rows, len, d, T(1), qs.row(r0), qs.ld, ks.row(k0), ks.ld, T(0), tile, width);
        for (int64_t r = 0; r < rows; ++r) {
          const auto [a, e] = visible(geo, r0 + r, k0, k1);
          const T c = geo.c(r0 + r);
          T* row = tile + r * width;
          zero_outside(row, a, e, len);
          Vec vsum(T(0)), vmax(T(0)), ex;
          int64_t x = a;
          for (; x + V <= e; x += V) {
            const Vec f = softplus(Vec::loadu(row + x) * Vec(c), ex);
            f.store(row + x);
            vsum = vsum + f;
            vmax = at::vec::maximum(vmax, f);
          }
          T sum = hsum(vsum), mx = hmax(vmax), es;
          for (; x < e; ++x) {
            const T f = softplus(row[x] * c, es);
            row[x] = f;
            sum += f;
            mx = std::max(mx, f);
          }
          z[r] += sum;
          fmax[r] = std::max(fmax[r], mx);
        }
        if (!reweight) {
          gemm<T>(false, false, rows, d, len, T(1), tile, width, vs.row(k0), vs.ld, T(1), acc.data(), d);
        }
      }

      // Pass 2 (LSSAR), tile by tile over the panel: w = (ReLU(f - t) / m)^p in place and u^(p-1) into tile_u,
      // then O += w V and U += u^(p-1) V. Flat rows (every f at the threshold, up to rounding: m_i <= 64 eps max f)
      // keep the stage-1 weights f: a rounding-level m_i would let noise pick the weights (and blow up their
      // gradients by 1/m_i).
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = geo.n(r0 + r);
        t[r] = reweight && n > 3 ? z[r] / T(n) : T(0);
        m[r] = reweight && fmax[r] - t[r] > kFlatTolerance<T> * fmax[r] ? fmax[r] - t[r] : T(0);
        w_sum[r] = reweight ? T(0) : z[r];
        g_sum[r] = T(0);
      }
      for (int64_t k0 = k_begin; reweight && k0 < k_end; k0 += blocks.k) {
        const int64_t k1 = std::min(k0 + blocks.k, k_end), len = k1 - k0;
        T* tile = panel.data() + (k0 - k_begin);
        for (int64_t r = 0; r < rows; ++r) {
          T* row = tile + r * width;
          T* row_u = save_u ? tile_u.data() + r * len : nullptr;
          if (row_u) std::fill(row_u, row_u + len, T(0));
          const auto [a, e] = visible(geo, r0 + r, k0, k1);
          Vec vsum(T(0)), vg(T(0));
          T sum = 0, gs = 0;
          int64_t x = a;
          if (!(m[r] > T(0))) {
            for (; x + V <= e; x += V) vsum = vsum + Vec::loadu(row + x);
            for (; x < e; ++x) sum += row[x];
          } else {
            const Vec vt(t[r]), vinv(T(1) / m[r]), zero(T(0));
            for (; x + V <= e; x += V) {
              const Vec u = at::vec::maximum(Vec::loadu(row + x) - vt, zero) * vinv;
              const Vec up = Vec::blendv(zero, pow_p1(u), u > zero);
              const Vec w = up * u;
              w.store(row + x);
              vsum = vsum + w;
              if (row_u) {
                up.store(row_u + x);
                vg = vg + up;
              }
            }
            for (; x < e; ++x) {
              const T u = std::max(row[x] - t[r], T(0)) / m[r];
              const T up = u > T(0) ? pow_p1(u) : T(0);
              sum += (row[x] = up * u);
              if (row_u) gs += (row_u[x] = up);
            }
          }
          w_sum[r] += sum + hsum(vsum);
          g_sum[r] += gs + hsum(vg);
        }
        gemm<T>(false, false, rows, d, len, T(1), tile, width, vs.row(k0), vs.ld, T(1), acc.data(), d);
        if (save_u) {
          gemm<T>(false, false, rows, d, len, T(1), tile_u.data(), len, vs.row(k0), vs.ld, T(1), acc_u.data(), d);
        }
      }

      T* o = out.data_ptr<T>() + (bh * n_q + r0) * d;
      T* st = stats.data_ptr<T>() + (bh * n_q + r0) * kStats;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t x = 0; x < d; ++x) o[r * d + x] = acc[r * d + x] / w_sum[r];
        st[r * kStats + kZ] = z[r];
        st[r * kStats + kT] = t[r];
        st[r * kStats + kM] = m[r];
        st[r * kStats + kW] = w_sum[r];
        st[r * kStats + kG] = g_sum[r];
      }
      if (save_u) {
        std::copy(acc_u.begin(), acc_u.begin() + rows * d, u_out.data_ptr<T>() + (bh * n_q + r0) * d);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& stats, const at::Tensor& u_acc, bool reweight, double p,
                   const Geometry& geo, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, Blocks blocks) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t batch = q.size(0), heads = q.size(1), n_q = q.size(2), n_k = k.size(2), d = q.size(3);
  const Power<T> pow_p1(p - 1.0);

  run_tasks(batch * heads, is_small(q, k), [&](const auto& next) {
    std::vector<T> s(blocks.q * blocks.k), dp(blocks.q * blocks.k), dd(n_q), hh(n_q);
    for (int64_t bh; (bh = next()) >= 0;) {
      const int64_t b = bh / heads, h = bh % heads;
      const auto qs = slice<T>(q, b, h), ks = slice<T>(k, b, h), vs = slice<T>(v, b, h);
      const auto gos = slice<T>(grad_out, b, h);
      const T* o = out.data_ptr<T>() + bh * n_q * d;
      const T* st = stats.data_ptr<T>() + bh * n_q * kStats;
      const T* ua = reweight ? u_acc.data_ptr<T>() + bh * n_q * d : nullptr;
      T* dqp = dq.data_ptr<T>() + bh * n_q * d;
      T* dkp = dk.data_ptr<T>() + bh * n_k * d;
      T* dvp = dv.data_ptr<T>() + bh * n_k * d;
      std::fill(dqp, dqp + n_q * d, T(0));
      std::fill(dkp, dkp + n_k * d, T(0));
      std::fill(dvp, dvp + n_k * d, T(0));
      // D_i = dO_i . O_i; LSSAR: H_i = p (dO_i . U_i - D_i G_i) / (W_i m_i), the row sum of dL/dg.
      for (int64_t i = 0; i < n_q; ++i) {
        const T* go = gos.row(i);
        T di = 0, du = 0;
        for (int64_t x = 0; x < d; ++x) di += go[x] * o[i * d + x];
        dd[i] = di;
        const T* sti = st + i * kStats;
        if (reweight && sti[kM] > T(0)) {
          for (int64_t x = 0; x < d; ++x) du += go[x] * ua[i * d + x];
          hh[i] = T(p) * (du - di * sti[kG]) / (sti[kW] * sti[kM]);
        } else {
          hh[i] = 0;
        }
      }
      for (int64_t r0 = 0; r0 < n_q; r0 += blocks.q) {
        const int64_t rows = std::min(blocks.q, n_q - r0);
        int64_t k_begin = geo.lo[r0], k_end = geo.hi[r0] + 1;
        for (int64_t r = 0; r < rows; ++r) {
          k_begin = std::min(k_begin, geo.lo[r0 + r]);
          k_end = std::max(k_end, geo.hi[r0 + r] + 1);
        }
        for (int64_t k0 = k_begin; k0 < k_end; k0 += blocks.k) {
          const int64_t k1 = std::min(k0 + blocks.k, k_end), len = k1 - k0, width = len;
          T* s_tile = s.data();
          T* dp_tile = dp.data();
          gemm<T>(false, true, rows, len, d, T(1), qs.row(r0), qs.ld, ks.row(k0), ks.ld, T(0), s_tile, width);
          gemm<T>(false, true, rows, len, d, T(1), gos.row(r0), gos.ld, vs.row(k0), vs.ld, T(0), dp_tile, width);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = r0 + r;
            const auto [a, e] = visible(geo, i, k0, k1);
            T* prow = s_tile + r * width;   // becomes A_ij (the weights)
            T* grow = dp_tile + r * width;  // becomes dS_ij
            zero_outside(prow, a, e, len);
            zero_outside(grow, a, e, len);
            const T* sti = st + i * kStats;
            const T c = geo.c(i), di = dd[i];
            int64_t x = a;
            Vec ex;
            T es;
            if (!reweight || !(sti[kM] > T(0))) {
              // LSSA (and LSSAR's flat rows): A = f / Z, dS = c sigmoid(c s) (dP - D) / Z.
              const T inv_z = T(1) / sti[kZ];
              const Vec vc(c), vz(inv_z), vd(di);
              for (; x + V <= e; x += V) {
                const Vec cs = Vec::loadu(prow + x) * vc;
                (softplus(cs, ex) * vz).store(prow + x);
                ((Vec::loadu(grow + x) - vd) * sigmoid_from(cs, ex) * vc * vz).store(grow + x);
              }
              for (; x < e; ++x) {
                const T cs = prow[x] * c;
                prow[x] = softplus(cs, es) * inv_z;
                grow[x] = (grow[x] - di) * sigmoid_from(cs, es) * c * inv_z;
              }
            } else {
              // LSSAR: u = ReLU(f - t) / m, A' = u^p / W, dL/df = h - o_i H_i / n_i with
              // h = p u^(p-1) (dP - D) / (W m), dS = dL/df c sigmoid(c s).
              const int64_t n = geo.n(i);
              const T inv_m = T(1) / sti[kM], inv_w = T(1) / sti[kW];
              const T hscale = T(p) * inv_w * inv_m, beta = n > 3 ? hh[i] / T(n) : T(0);
              const Vec vc(c), vt(sti[kT]), vm(inv_m), vw(inv_w), vd(di), vh(hscale), vb(beta), zero(T(0));
              for (; x + V <= e; x += V) {
                const Vec cs = Vec::loadu(prow + x) * vc;
                const Vec u = at::vec::maximum(softplus(cs, ex) - vt, zero) * vm;
                const Vec up = Vec::blendv(zero, pow_p1(u), u > zero);
                (up * u * vw).store(prow + x);
                const Vec dldf = up * vh * (Vec::loadu(grow + x) - vd) - vb;
                (dldf * vc * sigmoid_from(cs, ex)).store(grow + x);
              }
              for (; x < e; ++x) {
                const T cs = prow[x] * c;
                const T u = std::max(softplus(cs, es) - sti[kT], T(0)) * inv_m;
                const T up = u > T(0) ? pow_p1(u) : T(0);
                prow[x] = up * u * inv_w;
                grow[x] = (up * hscale * (grow[x] - di) - beta) * c * sigmoid_from(cs, es);
              }
            }
          }
          // dV += A^T dO, dQ^ += dS K^, dK^ += dS^T Q^ for the tile.
          gemm<T>(true, false, len, d, rows, T(1), s_tile, len, gos.row(r0), gos.ld, T(1), dvp + k0 * d, d);
          gemm<T>(false, false, rows, d, len, T(1), dp_tile, len, ks.row(k0), ks.ld, T(1), dqp + r0 * d, d);
          gemm<T>(true, false, len, d, rows, T(1), dp_tile, len, qs.row(r0), qs.ld, T(1), dkp + k0 * d, d);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D)");
  TORCH_CHECK(q.device().is_cpu(), "the CPU attention kernel needs CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "compute dtype must be fp32/fp64");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "last dimension must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "shapes of q, k, v do not match");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, bool reweight, double p,
                                                                 bool causal, int64_t q_offset,
                                                                 const at::Tensor& cu_seqlens, bool save_u,
                                                                 int64_t block_q, int64_t block_k) {
  check_inputs(q, k, v);
  const auto geo = make_geometry(q.size(2), k.size(2), q.size(3), causal, q_offset, cu_seqlens);
  auto out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  auto stats = at::empty({q.size(0), q.size(1), q.size(2), kStats}, q.options());
  save_u = save_u && reweight;
  const SerialBlas serial_blas;
  auto u = save_u ? at::empty_like(out) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "freeatten_cpu_attention_forward", [&] {
    forward_impl<scalar_t>(q, k, v, reweight, p, geo, out, stats, u, save_u, {block_q, block_k});
  });
  return {out, stats, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& stats, const at::Tensor& u, bool reweight, double p, bool causal, int64_t q_offset,
    const at::Tensor& cu_seqlens, int64_t block_q, int64_t block_k) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.stride(3) == 1, "grad_out must match out");
  TORCH_CHECK(out.is_contiguous() && stats.is_contiguous() && (!reweight || u.is_contiguous()),
              "saved tensors must be contiguous");
  const auto geo = make_geometry(q.size(2), k.size(2), q.size(3), causal, q_offset, cu_seqlens);
  auto dq = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  auto dk = at::empty({k.size(0), k.size(1), k.size(2), k.size(3)}, k.options());
  auto dv = at::empty_like(dk);
  const SerialBlas serial_blas;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "freeatten_cpu_attention_backward", [&] {
    backward_impl<scalar_t>(grad_out, q, k, v, out, stats, u, reweight, p, geo, dq, dk, dv, {block_q, block_k});
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(freeatten_cpu_kernels, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, bool reweight, float p, bool causal, int q_offset, Tensor cu_seqlens, "
      "bool save_u, int block_q, int block_k) -> (Tensor, Tensor, Tensor)");
  m.def(
      "backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor stats, Tensor u, bool reweight, "
      "float p, bool causal, int q_offset, Tensor cu_seqlens, int block_q, int block_k) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(freeatten_cpu_kernels, CPU, m) {
  m.impl("forward", &attention_forward);
  m.impl("backward", &attention_backward);
}
