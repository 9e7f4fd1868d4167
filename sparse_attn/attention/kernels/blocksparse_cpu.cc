// Block-sparse attention for XLA:CPU: forward and backward over a static tile list,
// multithreaded on XLA's intra-op thread pool. Compiled and loaded by
// sparse_attn/attention/kernels/cpu.py; the pure-JAX executor of the same computation is
// sparse_attn/attention/kernels/blocksparse/executor.py. Float32 only.
//
// Shapes (b = block size, NQ / NK = query / key blocks, Lq = NQ*b, Lk = NK*b, C = the
// longest tile list; Bm in {1, B} and Hm in {1, H} are the layout's batch and heads):
//   q, o, do, dq: [B, H, Lq, D]     k, v, dk, dv: [B, H, Lk, D]
//   kt, vt: [B, H, D, Lk]           lse: [B, H, Lq]      kvalid: u8 [B, Lk]
//   num: i32 [Bm, Hm, NQ]           cols, pidx: i32 [Bm, Hm, NQ, C]
//   tiles: u8 [P, b, b]  (the partial tiles' element masks; pidx -1 = a full tile)
// q arrives pre-scaled by 1/sqrt(D). A row with no attendable key outputs 0 and gets
// lse = +inf, as in the reference. Attention dropout (attribute `rate`, key `seed` u32[2])
// drops a weight by a counter-based hash of (seed, example * H + head, query, key), so
// the backward redraws the forward's pattern without storing it.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

constexpr float kNeg = -std::numeric_limits<float>::max();

inline v8 load8(const float* p) { return *reinterpret_cast<const v8*>(p); }
inline void store8(float* p, v8 x) { *reinterpret_cast<v8*>(p) = x; }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }

// exp(x) for x <= 0 (softmax arguments), 8 lanes: 2^n * p(r), r in [-ln2/2, ln2/2];
// relative error ~2e-7; 0 below -87.
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f);
  v8i under = x < lo;
  x = x < lo ? lo : x;
  v8 n = x * splat(1.44269504088896341f);
  n = __builtin_convertvector(__builtin_convertvector(n + (n < splat(0.f) ?
      splat(-0.5f) : splat(0.5f)), v8i), v8);  // round to nearest
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  v8 out = p * scale;
  return under ? splat(0.f) : out;
}

inline float exp1(float x) {
  float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  float out[8];
  store8(out, exp8(load8(buf)));
  return out[0];
}

// C[R x 16] (+)= A[R x K] . P[K x 16], P a packed 16-column panel of B.
template <int R>
inline void micro(int K, const float* A, int lda, const float* P, float* C, int ldc,
                  bool acc) {
  v8 c0[R], c1[R];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? load8(C + r * ldc) : splat(0.f);
    c1[r] = acc ? load8(C + r * ldc + 8) : splat(0.f);
  }
  for (int k = 0; k < K; ++k) {
    const v8 b0 = load8(P + 16 * k), b1 = load8(P + 16 * k + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const v8 a = splat(A[r * lda + k]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    store8(C + r * ldc, c0[r]);
    store8(C + r * ldc + 8, c1[r]);
  }
}

// C[M x N] (+)= A[M x K] . B[K x N], all row-major with leading dimensions. B is packed
// into contiguous 16-column panels first (its rows may be far apart, e.g. K^T rows).
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C,
          int ldc, bool acc) {
  thread_local std::vector<float> panel;
  panel.resize((size_t)K * 16);
  float* P = panel.data();
  int j = 0;
  for (; j + 16 <= N; j += 16) {
    for (int k = 0; k < K; ++k) {
      store8(P + 16 * k, load8(B + (int64_t)k * ldb + j));
      store8(P + 16 * k + 8, load8(B + (int64_t)k * ldb + j + 8));
    }
    int i = 0;
    for (; i + 6 <= M; i += 6) micro<6>(K, A + i * lda, lda, P, C + i * ldc + j, ldc, acc);
    const float* a = A + i * lda;
    float* c = C + i * ldc + j;
    switch (M - i) {
      case 5: micro<5>(K, a, lda, P, c, ldc, acc); break;
      case 4: micro<4>(K, a, lda, P, c, ldc, acc); break;
      case 3: micro<3>(K, a, lda, P, c, ldc, acc); break;
      case 2: micro<2>(K, a, lda, P, c, ldc, acc); break;
      case 1: micro<1>(K, a, lda, P, c, ldc, acc); break;
      default: break;
    }
  }
  for (; j < N; ++j)  // Column tail (N not a multiple of 16).
    for (int i = 0; i < M; ++i) {
      float s = acc ? C[i * ldc + j] : 0.f;
      for (int k = 0; k < K; ++k) s += A[i * lda + k] * B[(int64_t)k * ldb + j];
      C[i * ldc + j] = s;
    }
}

inline float hmax(v8 x) {
  float t[8];
  store8(t, x);
  return std::max(std::max(std::max(t[0], t[1]), std::max(t[2], t[3])),
                  std::max(std::max(t[4], t[5]), std::max(t[6], t[7])));
}

inline float hsum(v8 x) {
  float t[8];
  store8(t, x);
  return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

float row_max(const float* s, int n) {
  v8 m = splat(kNeg);
  int y = 0;
  for (; y + 8 <= n; y += 8) {
    v8 z = load8(s + y);
    m = z > m ? z : m;
  }
  float r = hmax(m);
  for (; y < n; ++y) r = std::max(r, s[y]);
  return r;
}

float row_sum(const float* s, int n) {
  v8 m = splat(0.f);
  int y = 0;
  for (; y + 8 <= n; y += 8) m += load8(s + y);
  float r = hsum(m);
  for (; y < n; ++y) r += s[y];
  return r;
}

// dst[n x m] = src[m x n]^T (src leading dim lds).
void transpose(int m, int n, const float* src, int lds, float* dst) {
  constexpr int T = 8;
  for (int i0 = 0; i0 < m; i0 += T)
    for (int j0 = 0; j0 < n; j0 += T)
      for (int i = i0; i < std::min(m, i0 + T); ++i)
        for (int j = j0; j < std::min(n, j0 + T); ++j) dst[j * m + i] = src[i * lds + j];
}

// Runs fn(0..n-1) on the caller and the pool's threads. Items are claimed from a shared
// counter, so the caller finishes everything itself if no pool thread ever starts.
void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    std::function<void(int64_t)> fn;
    int64_t n;
  };
  auto st = std::make_shared<State>();
  st->fn = fn;
  st->n = n;
  auto work = [st]() {
    int64_t i;
    while ((i = st->next.fetch_add(1)) < st->n) {
      st->fn(i);
      if (st->done.fetch_add(1) + 1 == st->n) {
        std::lock_guard<std::mutex> l(st->mu);
        st->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> l(st->mu);
  st->cv.wait(l, [&] { return st->done.load() == st->n; });
}

struct Layout {
  int B, H, Bm, Hm, NQ, NK, C, b, D;
  const int32_t* num;
  const int32_t* cols;
  const int32_t* pidx;
  const uint8_t* tiles;
  const uint8_t* kvalid;
  int64_t row(int bb, int h, int i) const {  // (Bm, Hm, NQ) index of a query block
    return ((int64_t)(Bm == 1 ? 0 : bb) * Hm + (Hm == 1 ? 0 : h)) * NQ + i;
  }
};

// Whether dropout keeps weight (row, key) of one (example, head): splitmix64 of the
// element's global indices, compared with rate * 2^32.
inline bool keep(uint64_t seed, int64_t bh, int64_t row, int64_t key, uint32_t cut) {
  uint64_t x = seed ^ ((uint64_t)bh * 0x9E3779B97F4A7C15ull) ^
               ((uint64_t)row * 0xC2B2AE3D27D4EB4Full) ^ ((uint64_t)key * 0x165667B19E3779F9ull);
  x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
  x ^= x >> 27; x *= 0x94D049BB133111EBull;
  x ^= x >> 31;
  return (uint32_t)(x >> 32) >= cut;
}

struct Dropout {
  float rate = 0.f;
  uint64_t seed = 0;
  uint32_t cut = 0;
  Dropout(float r, ffi::Buffer<ffi::U32> s) : rate(r) {
    const uint32_t* p = s.typed_data();
    seed = ((uint64_t)p[0] << 32) | p[1];
    cut = (uint32_t)std::min(4294967295.0, std::ceil((double)r * 4294967296.0));
  }
  // In place on a query block's [b x n*b] rows: X -> keep ? X / (1 - rate) : 0.
  void apply(const Layout& L, int64_t bh, int64_t r, int i, int n, float* X) const {
    const int b = L.b, ld = n * b;
    const float inv = 1.f / (1.f - rate);
    for (int x = 0; x < b; ++x)
      for (int c = 0; c < n; ++c) {
        const int64_t k0 = (int64_t)L.cols[r * L.C + c] * b;
        float* row = X + x * ld + c * b;
        for (int y = 0; y < b; ++y)
          row[y] = keep(seed, bh, (int64_t)i * b + x, k0 + y, cut) ? row[y] * inv : 0.f;
      }
  }
};

// S[b x n*b] = masked scores of query block i against its n listed key blocks.
// Returns n. Masked entries are kNeg.
int scores(const Layout& L, int bb, int h, int i, const float* q, const float* kt,
           float* S) {
  const int b = L.b, D = L.D, Lk = L.NK * b;
  const int64_t r = L.row(bb, h, i);
  const int n = L.num[r];
  const int ld = n * b;
  const float* qi = q + (int64_t)i * b * D;
  for (int c = 0; c < n; ++c) {
    const int kc = L.cols[r * L.C + c];
    gemm(b, b, D, qi, D, kt + (int64_t)kc * b, Lk, S + c * b, ld, false);
    const int p = L.pidx[r * L.C + c];
    const uint8_t* kv = L.kvalid + (int64_t)bb * Lk + (int64_t)kc * b;
    const uint8_t* tm = p >= 0 ? L.tiles + (int64_t)p * b * b : nullptr;
    bool all_valid = true;
    for (int y = 0; y < b; ++y) all_valid = all_valid && kv[y];
    if (!tm && all_valid) continue;
    for (int x = 0; x < b; ++x) {
      float* s = S + x * ld + c * b;
      for (int y = 0; y < b; ++y)
        if (!kv[y] || (tm && !tm[x * b + y])) s[y] = kNeg;
    }
  }
  return n;
}

// In place: S row x -> exp(S - sub[x]) (0 where masked). Row length ld.
void exp_rows(int b, int ld, float* S, const float* sub) {
  for (int x = 0; x < b; ++x) {
    float* s = S + x * ld;
    const v8 m = splat(sub[x]);
    int y = 0;
    for (; y + 8 <= ld; y += 8) {
      v8 z = load8(s + y);
      store8(s + y, (z == splat(kNeg)) ? splat(0.f) : exp8(z - m));
    }
    for (; y < ld; ++y) s[y] = s[y] == kNeg ? 0.f : exp1(s[y] - sub[x]);
  }
}

Layout make_layout(ffi::AnyBuffer q, ffi::AnyBuffer kt, ffi::Buffer<ffi::S32> num,
                   ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> pidx,
                   ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> kvalid) {
  Layout L;
  auto qd = q.dimensions(), ktd = kt.dimensions(), nd = num.dimensions(),
       cd = cols.dimensions();
  L.B = qd[0]; L.H = qd[1]; L.D = qd[3];
  L.Bm = nd[0]; L.Hm = nd[1]; L.NQ = nd[2]; L.C = cd[3];
  L.b = L.NQ > 0 ? qd[2] / L.NQ : 0;
  L.NK = L.b > 0 ? ktd[3] / L.b : 0;
  L.num = num.typed_data(); L.cols = cols.typed_data(); L.pidx = pidx.typed_data();
  L.tiles = tiles.typed_data(); L.kvalid = kvalid.typed_data();
  return L;
}

// Shape checks on what the layout indexes (the Python wrapper builds consistent inputs;
// this guards direct calls).
ffi::Error check(const Layout& L, ffi::AnyBuffer q, ffi::AnyBuffer kt) {
  if (q.element_type() != ffi::F32 || kt.element_type() != ffi::F32)
    return ffi::Error::InvalidArgument("sparse_attn CPU kernel: float32 only");
  if (L.b <= 0 || L.NQ * L.b != (int)q.dimensions()[2] ||
      L.NK * L.b != (int)kt.dimensions()[3])
    return ffi::Error::InvalidArgument("sparse_attn CPU kernel: query / key lengths are "
                                       "not multiples of the block size");
  if ((L.Bm != 1 && L.Bm != L.B) || (L.Hm != 1 && L.Hm != L.H))
    return ffi::Error::InvalidArgument("sparse_attn CPU kernel: the layout's batch / "
                                       "heads do not broadcast to the inputs'");
  const int64_t rows = (int64_t)L.Bm * L.Hm * L.NQ;
  for (int64_t r = 0; r < rows; ++r) {
    if (L.num[r] < 0 || L.num[r] > L.C)
      return ffi::Error::InvalidArgument("sparse_attn CPU kernel: bad tile count");
    for (int c = 0; c < L.num[r]; ++c)
      if (L.cols[r * L.C + c] < 0 || L.cols[r * L.C + c] >= L.NK)
        return ffi::Error::InvalidArgument("sparse_attn CPU kernel: key block out of "
                                           "range");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer kt,
                   ffi::AnyBuffer v, ffi::Buffer<ffi::S32> num,
                   ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> pidx,
                   ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> kvalid,
                   ffi::Buffer<ffi::U32> seed, float rate,
                   ffi::Result<ffi::Buffer<ffi::F32>> o,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  const Layout L = make_layout(q, kt, num, cols, pidx, tiles, kvalid);
  const Dropout drop(rate, seed);
  if (auto e = check(L, q, kt); e.failure()) return e;
  const int b = L.b, D = L.D, Lq = L.NQ * b, Lk = L.NK * b;
  const float* Q = static_cast<const float*>(q.untyped_data());
  const float* KT = static_cast<const float*>(kt.untyped_data());
  const float* V = static_cast<const float*>(v.untyped_data());
  float* O = o->typed_data();
  float* LSE = lse->typed_data();
  const int64_t items = (int64_t)L.B * L.H * L.NQ;
  parallel_for(pool, items, [&](int64_t it) {
    const int i = it % L.NQ, h = (it / L.NQ) % L.H, bb = it / ((int64_t)L.NQ * L.H);
    const int64_t bh = (int64_t)bb * L.H + h;
    thread_local std::vector<float> buf;
    buf.resize((size_t)b * std::max(L.C, 1) * b + 2 * b);
    float* S = buf.data();
    float* m = S + (size_t)b * std::max(L.C, 1) * b;
    float* z = m + b;
    const int n = scores(L, bb, h, i, Q + bh * Lq * D, KT + bh * D * Lk, S);
    const int ld = n * b;
    float* oi = O + (bh * Lq + (int64_t)i * b) * D;
    float* li = LSE + bh * Lq + (int64_t)i * b;
    for (int x = 0; x < b; ++x) m[x] = row_max(S + x * ld, ld);
    exp_rows(b, ld, S, m);
    for (int x = 0; x < b; ++x) z[x] = row_sum(S + x * ld, ld);
    if (drop.rate > 0.f) drop.apply(L, bh, L.row(bb, h, i), i, n, S);
    const float* vb = V + bh * Lk * D;
    if (n == 0) std::memset(oi, 0, sizeof(float) * b * D);
    for (int c = 0; c < n; ++c) {
      const int kc = L.cols[L.row(bb, h, i) * L.C + c];
      gemm(b, D, b, S + c * b, ld, vb + (int64_t)kc * b * D, D, oi, D, c > 0);
    }
    for (int x = 0; x < b; ++x) {
      const bool ok = m[x] > 0.5f * kNeg;
      const float inv = ok ? 1.f / z[x] : 0.f;
      for (int d = 0; d < D; ++d) oi[x * D + d] *= inv;
      li[x] = ok ? m[x] + std::log(z[x]) : std::numeric_limits<float>::infinity();
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer kt, ffi::AnyBuffer vt, ffi::AnyBuffer o,
                    ffi::AnyBuffer lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::S32> num,
                    ffi::Buffer<ffi::S32> cols, ffi::Buffer<ffi::S32> pidx,
                    ffi::Buffer<ffi::U8> tiles, ffi::Buffer<ffi::U8> kvalid,
                    ffi::Buffer<ffi::U32> seed, float rate,
                    ffi::Result<ffi::Buffer<ffi::F32>> dq,
                    ffi::Result<ffi::Buffer<ffi::F32>> dk,
                    ffi::Result<ffi::Buffer<ffi::F32>> dv) {
  const Layout L = make_layout(q, kt, num, cols, pidx, tiles, kvalid);
  if (auto e = check(L, q, kt); e.failure()) return e;
  const Dropout drop(rate, seed);
  const int b = L.b, D = L.D, Lq = L.NQ * b, Lk = L.NK * b;
  const float* Q = static_cast<const float*>(q.untyped_data());
  const float* K = static_cast<const float*>(k.untyped_data());
  const float* KT = static_cast<const float*>(kt.untyped_data());
  const float* VT = static_cast<const float*>(vt.untyped_data());
  const float* O = static_cast<const float*>(o.untyped_data());
  const float* LSE = static_cast<const float*>(lse.untyped_data());
  const float* DO = static_cast<const float*>(dout.untyped_data());
  float* DQ = dq->typed_data();
  float* DK = dk->typed_data();
  float* DV = dv->typed_data();
  // One (example, head) per item: its dK, dV rows are written by that item only.
  parallel_for(pool, (int64_t)L.B * L.H, [&](int64_t bh) {
    const int bb = bh / L.H, h = bh % L.H;
    const size_t sz = (size_t)b * std::max(L.C, 1) * b;
    thread_local std::vector<float> buf;
    buf.resize(2 * sz + (size_t)b * b + b);
    float* S = buf.data();        // P
    float* dP = S + sz;           // dP, then dS
    float* T = dP + sz;           // a transposed [b, b] tile
    float* delta = T + (size_t)b * b;
    const float* qb = Q + bh * Lq * D;
    const float* kb = K + bh * Lk * D;
    const float* ktb = KT + bh * D * Lk;
    const float* vtb = VT + bh * D * Lk;
    float* dqb = DQ + bh * Lq * D;
    float* dkb = DK + bh * Lk * D;
    float* dvb = DV + bh * Lk * D;
    std::memset(dqb, 0, sizeof(float) * Lq * D);
    std::memset(dkb, 0, sizeof(float) * Lk * D);
    std::memset(dvb, 0, sizeof(float) * Lk * D);
    for (int i = 0; i < L.NQ; ++i) {
      const int n = scores(L, bb, h, i, qb, ktb, S);
      if (n == 0) continue;
      const int ld = n * b;
      const float* li = LSE + bh * Lq + (int64_t)i * b;
      const float* oi = O + (bh * Lq + (int64_t)i * b) * D;
      const float* doi = DO + (bh * Lq + (int64_t)i * b) * D;
      const float* qi = qb + (int64_t)i * b * D;
      exp_rows(b, ld, S, li);  // P = exp(S - lse); rows with lse = inf give 0
      for (int x = 0; x < b; ++x) {
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += doi[x * D + d] * oi[x * D + d];
        delta[x] = s;
      }
      const int64_t r = L.row(bb, h, i);
      for (int c = 0; c < n; ++c) {
        const int kc = L.cols[r * L.C + c];
        gemm(b, b, D, doi, D, vtb + (int64_t)kc * b, Lk, dP + c * b, ld, false);
      }
      if (drop.rate > 0.f) drop.apply(L, bh, r, i, n, dP);  // dP of the dropped weights
      for (int x = 0; x < b; ++x)  // dS = P (dP - delta)
        for (int y = 0; y < ld; ++y)
          dP[x * ld + y] = S[x * ld + y] * (dP[x * ld + y] - delta[x]);
      if (drop.rate > 0.f) drop.apply(L, bh, r, i, n, S);   // P -> dropped P, for dV
      for (int c = 0; c < n; ++c) {
        const int kc = L.cols[r * L.C + c];
        transpose(b, b, S + c * b, ld, T);                 // P^T
        gemm(b, D, b, T, b, doi, D, dvb + (int64_t)kc * b * D, D, true);
        transpose(b, b, dP + c * b, ld, T);                // dS^T
        gemm(b, D, b, T, b, qi, D, dkb + (int64_t)kc * b * D, D, true);
        gemm(b, D, b, dP + c * b, ld, kb + (int64_t)kc * b * D, D,
             dqb + (int64_t)i * b * D, D, true);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseAttnBlockSparseFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparseAttnBlockSparseBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<float>("rate")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
