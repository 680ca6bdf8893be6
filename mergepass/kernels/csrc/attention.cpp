// Attention for x86 CPUs without AMX: softmax(scale * q kᵀ + bias) v in one pass per (batch, head).
//
// torch's CPU flash attention runs fp32 micro-GEMMs here; its bf16 variant goes through cpublas, which
// without AMX is no faster. Three kernels; mergepass/kernels/attention.py times those the CPU can run
// against SDPA on the machine that runs them and keeps the fastest (which one wins depends on the core,
// not only on its ISA):
//   bf16_attention: bf16 dot products (vdpbf16ps, fp32 accumulation) for q kᵀ and p v.
//   int8_attention: u8 x s8 dot products (vpdpbusd) with dynamic scales: k and v centred on their means
//     over the keys, per query row and per key row scales for q kᵀ, probabilities as u8 (0..255 of the
//     row max) normalised by their unrounded sum, per-channel v scales for p v. Reads fp32 or bf16.
//   int16_attention (AVX2): the same scheme with int16 pair dot products (vpmaddwd), for CPUs without
//     AVX-512; a head holding inf or NaN is computed exactly instead.
// Both pack k and v of one head once, then walk the queries MR rows at a time: a row block of scores,
// its fp32 softmax (vectorised exp), and its share of the output.
// the narrow headers, not <ATen/ATen.h>: a first-use build takes seconds less
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MERGEPASS_AVX512 1
#endif
#if defined(MERGEPASS_AVX512) && defined(__AVX512BF16__)
#define MERGEPASS_BF16_ATTENTION 1
#endif
#if defined(MERGEPASS_AVX512) && defined(__AVX512VNNI__)
#define MERGEPASS_INT8_ATTENTION 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MERGEPASS_INT16_ATTENTION 1
#endif

// The dot-product micro-kernels keep their MR x NB accumulators in registers only when every loop over
// them is unrolled (#pragma GCC unroll: clang reads it too; GCC 12 misplaces it when written as _Pragma
// in a macro) and GCC does not coalesce them with their copies: GCC 12 otherwise moves each accumulator
// through a scratch register around every vpdpbusd, or keeps them on the stack.
#if defined(__GNUC__) && !defined(__clang__)
#define MERGEPASS_DOT_KERNEL __attribute__((optimize("no-tree-coalesce-vars")))
#else
#define MERGEPASS_DOT_KERNEL
#endif

namespace {

constexpr int MR = 4;  // query rows per block
constexpr int L = 16;  // fp32 lanes per zmm

struct Dims {
  int64_t nq, nk, d, dv;
  int64_t d2, nkb, nk2, dvb;  // bf16: d pairs, key blocks of 16, key pairs, dv blocks of 16
  int64_t d4, nk4;            // int8: d quads, key quads
};

// Calls body(std::integral_constant<int, N>{}, start) over [0, n) in chunks of MAXN, then one chunk of the
// remainder: kernels templated on a block count keep that many accumulators in registers.
template <int N, typename Body>
inline void remainder_chunk(int64_t left, int64_t at, Body& body) {
  if constexpr (N > 0) {
    if (left == N)
      body(std::integral_constant<int, N>{}, at);
    else
      remainder_chunk<N - 1>(left, at, body);
  }
}

template <int MAXN, typename Body>
inline void in_chunks(int64_t n, Body&& body) {
  int64_t i = 0;
  for (; i + MAXN <= n; i += MAXN) body(std::integral_constant<int, MAXN>{}, i);
  remainder_chunk<MAXN - 1>(n - i, i, body);
}

#ifdef MERGEPASS_AVX512
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline __mmask16 lanes(int64_t left) {
  return left >= L ? static_cast<__mmask16>(0xFFFF) : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : 0;
}

// exp(x) for softmax inputs (x <= 0 after the row max is subtracted); -inf and very negative inputs
// give 0, NaN stays NaN. Cephes' single-precision polynomial, 2^n applied with vscalefps.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(lo, x);  // the second operand is returned when either is NaN: keep NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), tiny, _mm512_setzero_ps());
}

// 2^t for softmax in base 2 (t <= 8 after the row max is subtracted): t below -126 gives 0, NaN stays
// NaN. A degree-5 polynomial for 2^f, f in [-1/2, 1/2] (relative error 2.3e-7), 2^n applied with
// vscalefps: four fewer operations than exp16's range reduction in base e.
inline __m512 exp2_16(__m512 t) {
  const __m512 lo = _mm512_set1_ps(-126.f);
  const __mmask16 tiny = _mm512_cmp_ps_mask(t, lo, _CMP_LT_OQ);
  t = _mm512_max_ps(lo, t);  // the second operand is returned when either is NaN: keep NaN
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.326697064e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675459936e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550742522e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212173e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000119e+0f));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(p, n), tiny, _mm512_setzero_ps());
}

constexpr float LOG2E = 1.44269504088896341f;

// Scores of one row times scale, with the bias added and the lanes past nk at -inf; returns the row max
// (0 for a row with no finite score, so that its exps are 0 rather than NaN).
inline float logits_row(float* row, const Dims& s, __m512 scale, const float* brow) {
  const int64_t stride = s.nkb * L;
  __m512 vmax = _mm512_set1_ps(NEG_INF);
  for (int64_t j = 0; j < stride; j += L) {
    const __mmask16 m = lanes(s.nk - j);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), scale);
    if (brow) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, brow + j));
    x = _mm512_mask_mov_ps(_mm512_set1_ps(NEG_INF), m, x);
    _mm512_storeu_ps(row + j, x);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float mx = _mm512_reduce_max_ps(vmax);
  return mx == NEG_INF ? 0.f : mx;
}

// 16 values of a row as fp32 lanes (masked lanes 0): fp32 as it is, bf16 (raw uint16_t) widened exactly
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store16(float* p, __mmask16 m, __m512 x) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(uint16_t* p, __mmask16 m, __m512 x) {
  // round to nearest even, as at::BFloat16 does; NaN stays NaN
  __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// acc += a . b (u8 x s8 quads; bf16 pairs). GCC 12 gives the intrinsics' tied accumulator a fresh register
// and copies it back every iteration (and spills it when the accumulators are an array): the "+v" operand
// keeps each accumulator in one register.
inline __m512i dot_u8s8(__m512i acc, __m512i a, __m512i b) {
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512VNNI__)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#elif defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, a, b);
#else
  (void)a; (void)b;
  return acc;
#endif
}

#ifdef __AVX512BF16__
inline __m512 dot_bf16(__m512 acc, __m512bh a, __m512bh b) {
#if defined(__GNUC__) && !defined(__clang__)
  asm("vdpbf16ps %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#else
  return _mm512_dpbf16_ps(acc, a, b);
#endif
}
#endif

// Asks for the n bytes at p (a strided q, k or v row) ahead of their use: rows of a qkv projection lie
// thousands of bytes apart, too far apart for the hardware prefetcher to run ahead of the row loops.
inline void prefetch_row(const void* p, int64_t n) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(c + i, _MM_HINT_T0);
}

inline float normaliser(float sum) { return sum > 0.f ? 1.f / sum : (std::isnan(sum) ? sum : 0.f); }

#endif  // MERGEPASS_AVX512

// ---------------------------------------------------------------------------------------------------
#ifdef MERGEPASS_BF16_ATTENTION
namespace bf16 {

inline uint32_t pack_pair(float lo, float hi) {
  // round-to-nearest-even, as vcvtne2ps2bf16 does
  __m128 v = _mm_set_ps(0.f, 0.f, hi, lo);
  __m128bh b = _mm_cvtneps_pbh(v);
  uint32_t out;
  std::memcpy(&out, &b, sizeof(out));
  return out;
}

// Converts 2 x 16 floats (even and odd pair members) into 16 bf16 pairs.
inline __m512i pairs16(__m512 lo, __m512 hi) {
  // vcvtne2ps2bf16(a, b): lower 16 bf16 from b, upper 16 from a; interleave so that lane i holds (lo_i, hi_i)
  __m512bh both = _mm512_cvtne2ps_pbh(hi, lo);
  __m512i w = (__m512i)both;
  // 16-bit elements: [lo0..lo15, hi0..hi15] -> [lo0, hi0, lo1, hi1, ...]
  const __m512i perm = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(perm, w);
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// One row of n floats as ceil(n / 2) bf16 pairs (zero padded).
inline void row_pairs(const float* x, int64_t n, uint32_t* out) {
  for (int64_t i = 0; i < n; i += 2 * L) {
    const __m512 lo = _mm512_maskz_loadu_ps(lanes(n - i), x + i);
    const __m512 hi = _mm512_maskz_loadu_ps(lanes(n - i - L), x + i + L);
    const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // 32 bf16 in order: lane t = (x[2t], x[2t + 1])
    const int64_t pairs = std::min<int64_t>(L, (n - i + 1) / 2);
    _mm512_mask_storeu_epi32(out + i / 2, lanes(pairs), w);
  }
}

// k [nk, d] (fp32, row stride ks) -> kp
void pack_k(const float* k, int64_t ks, const Dims& s, uint32_t* kp) {
  std::fill(kp, kp + s.nkb * s.d2 * L, 0u);
  std::vector<uint32_t> row(s.d2 + L);
  for (int64_t j = 0; j < s.nk; ++j) {
    row_pairs(k + j * ks, s.d, row.data());
    uint32_t* dst = kp + (j / L) * s.d2 * L + j % L;
    for (int64_t t = 0; t < s.d2; ++t) dst[t * L] = row[t];
  }
}

// v [nk, dv] -> vp
void pack_v(const float* v, int64_t vs, const Dims& s, uint32_t* vp) {
  for (int64_t u = 0; u < s.nk2; ++u) {
    const int64_t j0 = 2 * u, j1 = 2 * u + 1;
    for (int64_t db = 0; db < s.dvb; ++db) {
      const int64_t c0 = db * L;
      if (j1 < s.nk && c0 + L <= s.dv) {
        _mm512_storeu_si512(vp + (u * s.dvb + db) * L,
                            pairs16(_mm512_loadu_ps(v + j0 * vs + c0), _mm512_loadu_ps(v + j1 * vs + c0)));
        continue;
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t c = c0 + l;
        const float lo = (j0 < s.nk && c < s.dv) ? v[j0 * vs + c] : 0.f;
        const float hi = (j1 < s.nk && c < s.dv) ? v[j1 * vs + c] : 0.f;
        vp[(u * s.dvb + db) * L + l] = pack_pair(lo, hi);
      }
    }
  }
}

// scores[MR][nkb * 16] = (q rows qp) . kp, in fp32
MERGEPASS_DOT_KERNEL void scores_block(const uint32_t* qp, const uint32_t* kp, const Dims& s, float* sc) {
  const int64_t stride = s.nkb * L;
  int64_t jb = 0;
  for (; jb + 2 <= s.nkb; jb += 2) {
    __m512 acc[MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + jb * s.d2 * L;
    const uint32_t* k1 = k0 + s.d2 * L;
    for (int64_t t = 0; t < s.d2; ++t) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + t * L));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(k1 + t * L));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(qp[r * s.d2 + t])));
        acc[r][0] = dot_bf16(acc[r][0], a, b0);
        acc[r][1] = dot_bf16(acc[r][1], a, b1);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(sc + r * stride + jb * L, acc[r][0]);
      _mm512_storeu_ps(sc + r * stride + (jb + 1) * L, acc[r][1]);
    }
  }
  for (; jb < s.nkb; ++jb) {
    __m512 acc[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + jb * s.d2 * L;
    for (int64_t t = 0; t < s.d2; ++t) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + t * L));
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
        acc[r] = dot_bf16(acc[r], as_bh(_mm512_set1_epi32(static_cast<int>(qp[r * s.d2 + t]))), b0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(sc + r * stride + jb * L, acc[r]);
  }
}

// out rows += pp . vp for DB dv blocks starting at db0; fp32 accumulators, scaled by inv[r] on store
template <int DB>
MERGEPASS_DOT_KERNEL void pv_block(const uint32_t* pp, const uint32_t* vp, const Dims& s, int64_t db0, const float* inv, float* out,
              int64_t os, int rows) {
  __m512 acc[MR][DB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t u = 0; u < s.nk2; ++u) {
    __m512bh b[DB];
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) b[c] = as_bh(_mm512_loadu_si512(vp + (u * s.dvb + db0 + c) * L));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(pp[r * s.nk2 + u])));
#pragma GCC unroll 16
      for (int c = 0; c < DB; ++c) acc[r][c] = dot_bf16(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;  // bounded by MR: the accumulators stay in registers
    const __m512 scale = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) {
      const int64_t c0 = (db0 + c) * L;
      _mm512_mask_storeu_ps(out + r * os + c0, lanes(s.dv - c0), _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

void pv_rows(const uint32_t* pp, const uint32_t* vp, const Dims& s, const float* inv, float* out, int64_t os,
             int rows) {
  in_chunks<4>(s.dvb, [&](auto n, int64_t db) { pv_block<decltype(n)::value>(pp, vp, s, db, inv, out, os, rows); });
}

// one (batch, head): q [nq, d], k [nk, d], v [nk, dv], bias rows (stride bi per query, or null), out [nq, dv]
void attend_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs,
                 const float* bias, int64_t bi, float scale, const Dims& s, float* out, int64_t os) {
  std::vector<uint32_t> kp(s.nkb * s.d2 * L), vp(s.nk2 * s.dvb * L), qp(MR * s.d2 + L), pp(MR * s.nk2);
  std::vector<float> sc(MR * s.nkb * L);
  pack_k(k, ks, s, kp.data());
  pack_v(v, vs, s, vp.data());
  const int64_t stride = s.nkb * L;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < s.nq; i0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, s.nq - i0));
    for (int r = 0; r < MR; ++r) {
      if (r < rows)
        row_pairs(q + (i0 + r) * qs, s.d, qp.data() + r * s.d2);
      else
        std::fill(qp.begin() + r * s.d2, qp.begin() + (r + 1) * s.d2, 0u);
    }
    scores_block(qp.data(), kp.data(), s, sc.data());
    float inv[MR];
    for (int r = 0; r < MR; ++r) {
      float* row = sc.data() + r * stride;
      uint32_t* prow = pp.data() + r * s.nk2;
      if (r >= rows) {
        std::fill(prow, prow + s.nk2, 0u);
        inv[r] = 0.f;
        continue;
      }
      const float* brow = bias ? bias + (i0 + r) * bi : nullptr;
      const float mx = logits_row(row, s, vscale, brow);
      const __m512 vm = _mm512_set1_ps(mx);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < stride; j += 2 * L) {
        const __m512 e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm));
        const __m512 e1 = j + L < stride ? exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j + L), vm)) : _mm512_setzero_ps();
        vsum = _mm512_add_ps(vsum, _mm512_add_ps(e0, e1));
        // 32 probabilities = 16 key pairs (j, j+1): deinterleave into even/odd members first
        const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i od = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        const __m512 lo = _mm512_permutex2var_ps(e0, ev, e1), hi = _mm512_permutex2var_ps(e0, od, e1);
        const int64_t u0 = j / 2, n = std::min<int64_t>(L, s.nk2 - u0);
        if (n == L) {
          _mm512_storeu_si512(prow + u0, pairs16(lo, hi));
        } else if (n > 0) {
          alignas(64) uint32_t tmp[L];
          _mm512_store_si512(tmp, pairs16(lo, hi));
          std::memcpy(prow + u0, tmp, n * sizeof(uint32_t));
        }
      }
      const float sum = _mm512_reduce_add_ps(vsum);
      inv[r] = normaliser(sum);
    }
    pv_rows(pp.data(), vp.data(), s, inv, out + i0 * os, os, rows);
  }
}

}  // namespace bf16
#endif  // MERGEPASS_BF16_ATTENTION

// ---------------------------------------------------------------------------------------------------
#ifdef MERGEPASS_INT8_ATTENTION
namespace i8 {

// Symmetric int8 of n contiguous floats, written as ceil(n / 4) * 4 bytes (zero padded): returns the scale
// (max |x| / 127; 1 for an all-zero row; NaN, with zeros written, for a row holding NaN or inf, so that
// the result is NaN as SDPA's would be) and, in *sum, the sum of the int8 values. U8: written as
// x8 + 128 (vpdpbusd's unsigned operand; padding 128 too, as it multiplies zero padding). centre: quantize
// x - centre (ceil(n / 16) * 16 values, 0 past n), subtracted in registers.
template <bool U8 = false, typename T>
inline float quantize_row(const T* x, int64_t n, void* out_, int32_t* sum, const float* centre = nullptr) {
  int8_t* out = static_cast<int8_t*>(out_);
  auto at = [&](int64_t i, __mmask16 m) {
    const __m512 a = load16(x + i, m);
    return centre ? _mm512_sub_ps(a, _mm512_loadu_ps(centre + i)) : a;
  };
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t i = 0; i < n; i += L) {
    const __m512 a = _mm512_abs_ps(at(i, lanes(n - i)));
    bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);  // inf, NaN
    vmax = _mm512_max_ps(vmax, a);
  }
  const int64_t padded = (n + 3) / 4 * 4;
  if (bad) {
    std::memset(out, U8 ? 128 : 0, padded);
    if (sum) *sum = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  const float sc = amax > 0.f ? amax / 127.f : 1.f;
  const __m512 inv = _mm512_set1_ps(1.f / sc);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t i = 0; i < padded; i += L) {
    const __mmask16 m = lanes(n - i);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(at(i, m), inv));
    v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    acc = _mm512_add_epi32(acc, v);
    const __m128i b = U8 ? _mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(128))) : _mm512_cvtepi32_epi8(v);
    // a full 16 bytes as a plain store: a masked store does not forward to the dot products' loads
    if (padded - i >= L)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), b);
    else
      _mm_mask_storeu_epi8(out + i, lanes(padded - i), b);
  }
  if (sum) *sum = _mm512_reduce_add_epi32(acc);
  return sc;
}

struct Head {
  std::vector<uint32_t> kq, vq;   // kq[key block][d quad][16 keys], vq[key quad][dv block][16 dims]
  std::vector<float> kscale, vscale;
  std::vector<int32_t> ksum128;    // 128 * sum_d k8[j][d]: undoes q's +128 offset (u8 x s8 products)
  std::vector<float> vmean;        // the mean of v over the keys, per channel: added back to every output row
  std::vector<int64_t> nonfinite;  // keys holding inf or NaN: their logits are computed exactly (see exact_logits)
};

inline float scalar(const float* p) { return *p; }
inline float scalar(const uint16_t* p) {
  const uint32_t u = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The mean over n rows of x (row stride xs) for each of the first `width` channels, in out[ceil(width / 16) * 16]
// (padding 0); a channel holding inf or NaN gets 0, so that smoothing never spreads one bad value over the head.
template <typename T>
void channel_means(const T* x, int64_t xs, int64_t n, int64_t width, float* out) {
  const __m512 inv = _mm512_set1_ps(1.f / static_cast<float>(n));
  for (int64_t c = 0; c < width; c += L) {
    const __mmask16 m = lanes(width - c);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      if (c == 0 && j + 8 < n) prefetch_row(x + (j + 8) * xs, width * sizeof(T));
      acc = _mm512_add_ps(acc, load16(x + j * xs + c, m));
    }
    const __m512 mean = _mm512_mul_ps(acc, inv);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(mean), _mm512_set1_ps(std::numeric_limits<float>::max()),
                                                _CMP_LE_OQ);
    _mm512_storeu_ps(out + c, _mm512_maskz_mov_ps(finite & m, mean));
  }
}

template <typename T>
void pack_head(const T* k, int64_t ks, const T* v, int64_t vs, const Dims& s, Head& h) {
  std::vector<int8_t> row(s.d4 * 4 + 64, 0);
  h.kq.assign(s.nkb * s.d4 * L, 0u);
  h.kscale.assign(s.nkb * L, 0.f);
  h.ksum128.assign(s.nkb * L, 0);
  // k smoothing: q . (k_j - mean k) differs from q . k_j by one constant per query row, which softmax ignores;
  // centred rows quantize with smaller steps where a head's keys share a large offset
  const int64_t dpad = (s.d + L - 1) / L * L;
  std::vector<float> kmean(dpad);
  channel_means(k, ks, s.nk, s.d, kmean.data());
  for (int64_t j = 0; j < s.nk; ++j) {
    int32_t sum = 0;
    h.kscale[j] = quantize_row(k + j * ks, s.d, row.data(), &sum, kmean.data());
    if (std::isnan(h.kscale[j])) {  // a key holding inf or NaN: logit 0 here, replaced by its exact value
      h.kscale[j] = 0.f;
      h.nonfinite.push_back(j);
    }
    h.ksum128[j] = 128 * sum;
    uint32_t* dst = h.kq.data() + (j / L) * s.d4 * L + j % L;
    for (int64_t t = 0; t < s.d4; ++t) std::memcpy(dst + t * L, row.data() + 4 * t, 4);
  }
  // v, centred on its mean over the keys (added back to the output): one scale per channel (column) over
  // the keys, then 4 keys' bytes interleaved per channel. With the normaliser taken from the unrounded
  // probabilities, the mass that rounds to 0 in u8 is then given the mean of v rather than the row's peaks.
  h.vscale.assign(s.dvb * L, 1.f);
  h.vmean.assign(s.dvb * L, 0.f);
  channel_means(v, vs, s.nk, s.dv, h.vmean.data());
  std::vector<float> inv(s.dvb * L, 0.f);
  for (int64_t db = 0; db < s.dvb; ++db) {
    const __mmask16 m = lanes(s.dv - db * L);
    const __m512 vm = _mm512_loadu_ps(h.vmean.data() + db * L);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t j = 0; j < s.nk; ++j) {
      const __m512 a = _mm512_abs_ps(_mm512_sub_ps(load16(v + j * vs + db * L, m), vm));
      bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ);
      vmax = _mm512_max_ps(vmax, a);
    }
    __m512 sc = _mm512_div_ps(vmax, _mm512_set1_ps(127.f));
    sc = _mm512_mask_mov_ps(sc, _mm512_cmp_ps_mask(vmax, _mm512_setzero_ps(), _CMP_EQ_OQ), _mm512_set1_ps(1.f));
    __m512 iv = _mm512_div_ps(_mm512_set1_ps(1.f), sc);
    sc = _mm512_mask_mov_ps(sc, bad, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
    iv = _mm512_mask_mov_ps(iv, bad, _mm512_setzero_ps());
    _mm512_storeu_ps(h.vscale.data() + db * L, sc);
    _mm512_storeu_ps(inv.data() + db * L, iv);
  }
  h.vq.assign(s.nk4 * s.dvb * L, 0u);
  for (int64_t u = 0; u < s.nk4; ++u)
    for (int64_t db = 0; db < s.dvb; ++db) {
      const __mmask16 m = lanes(s.dv - db * L);
      const __m512 iv = _mm512_loadu_ps(inv.data() + db * L);
      const __m512 vm = _mm512_loadu_ps(h.vmean.data() + db * L);
      __m128i b[4];
      for (int e = 0; e < 4; ++e) {
        const int64_t j = 4 * u + e;
        __m512i x = _mm512_setzero_si512();
        if (j < s.nk) x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(load16(v + j * vs + db * L, m), vm), iv));
        x = _mm512_max_epi32(_mm512_min_epi32(x, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
        b[e] = _mm512_cvtepi32_epi8(x);
      }
      const __m128i t0 = _mm_unpacklo_epi8(b[0], b[1]), t1 = _mm_unpackhi_epi8(b[0], b[1]);
      const __m128i t2 = _mm_unpacklo_epi8(b[2], b[3]), t3 = _mm_unpackhi_epi8(b[2], b[3]);
      __m128i* dst = reinterpret_cast<__m128i*>(h.vq.data() + (u * s.dvb + db) * L);
      _mm_storeu_si128(dst + 0, _mm_unpacklo_epi16(t0, t2));  // channels 0-3: 4 keys each
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(t0, t2));
      _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(t1, t3));
      _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(t1, t3));
    }
}

// scores[MR][16 * NB keys from block jb] in fp32 = (q8 . k8) * q scale * k scale, from u8 (q8 + 128) x s8
// products; NB key blocks at once keep 4 * NB independent accumulators (vpdpbusd's latency is 5 cycles)
template <int NB>
MERGEPASS_DOT_KERNEL void scores_blocks(const uint32_t* qp, const float* qscale, const float* const* brows, const Head& h,
                                        const Dims& s, int64_t jb, float* sc, __m512* vmax) {
  const int64_t stride = s.nkb * L;
  __m512i acc[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_si512();
  const uint32_t* k0 = h.kq.data() + jb * s.d4 * L;
  for (int64_t t = 0; t < s.d4; ++t) {
    __m512i b[NB];
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) b[c] = _mm512_loadu_si512(k0 + (c * s.d4 + t) * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(qp[r * s.d4 + t]));
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[r][c] = dot_u8s8(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NB; ++c) {
    const int64_t j = (jb + c) * L;
    const __mmask16 m = lanes(s.nk - j);
    const __m512i corr = _mm512_loadu_si512(h.ksum128.data() + j);
    const __m512 ksc = _mm512_loadu_ps(h.kscale.data() + j);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][c], corr));
      __m512 x = _mm512_mul_ps(_mm512_mul_ps(dot, ksc), _mm512_set1_ps(qscale[r]));
      if (brows[r]) x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, brows[r] + j), _mm512_set1_ps(LOG2E), x);
      x = _mm512_mask_mov_ps(_mm512_set1_ps(NEG_INF), m, x);
      _mm512_storeu_ps(sc + r * stride + j, x);
      vmax[r] = _mm512_max_ps(vmax[r], x);
    }
  }
}

// The logits of MR query rows in base 2 (bias added, keys past nk at -inf) and each row's max (0 for a row with no
// finite logit, so that its exps are 0 rather than NaN).
void logits_block(const uint32_t* qp, const float* qscale, const float* const* brows, const Head& h, const Dims& s,
                  float* sc, float* mx) {
  __m512 vmax[MR];
  for (int r = 0; r < MR; ++r) vmax[r] = _mm512_set1_ps(NEG_INF);
  in_chunks<3>(s.nkb, [&](auto n, int64_t jb) { scores_blocks<decltype(n)::value>(qp, qscale, brows, h, s, jb, sc, vmax); });
  for (int r = 0; r < MR; ++r) {
    const float m = _mm512_reduce_max_ps(vmax[r]);
    mx[r] = m == NEG_INF ? 0.f : m;
  }
}

// out rows = (p8 . v8) * v scale / (unrounded sum of p) + mean(v), for DB dv blocks starting at db0
template <int DB, typename T>
MERGEPASS_DOT_KERNEL void pv_block(const uint32_t* pp, const Head& h, const Dims& s, int64_t db0, const float* inv, T* out,
              int64_t os, int rows) {
  __m512i acc[MR][DB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t u = 0; u < s.nk4; ++u) {
    __m512i b[DB];
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) b[c] = _mm512_loadu_si512(h.vq.data() + (u * s.dvb + db0 + c) * L);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(pp[r * s.nk4 + u]));
#pragma GCC unroll 16
      for (int c = 0; c < DB; ++c) acc[r][c] = dot_u8s8(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;  // r bounded by MR, not rows: the accumulators stay in registers
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) {
      const int64_t c0 = (db0 + c) * L;
      const __m512 sc = _mm512_mul_ps(_mm512_loadu_ps(h.vscale.data() + c0), _mm512_set1_ps(inv[r]));
      // a row with no finite score (normaliser 0) stays 0, as before smoothing
      const __m512 vm = inv[r] != 0.f ? _mm512_loadu_ps(h.vmean.data() + c0) : _mm512_setzero_ps();
      store16(out + r * os + c0, lanes(s.dv - c0), _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][c]), sc, vm));
    }
  }
}

template <typename T>
void pv_rows(const uint32_t* pp, const Head& h, const Dims& s, const float* inv, T* out, int64_t os, int rows) {
  in_chunks<4>(s.dvb, [&](auto n, int64_t db) { pv_block<decltype(n)::value>(pp, h, s, db, inv, out, os, rows); });
}

// The logits of the keys holding inf or NaN, as SDPA computes them (a key with a -inf element gets logit -inf
// from a query whose element there is positive, so that key alone drops out, where int8 would make the
// whole head NaN), then each row's max again.
template <typename T>
void exact_logits(const T* q, int64_t qs, const T* k, int64_t ks, const float* const* brows, float scale,
                  const Head& h, const Dims& s, int rows, float* sc, float* mx) {
  const int64_t stride = s.nkb * L;
  for (int r = 0; r < rows; ++r) {
    for (const int64_t j : h.nonfinite) {
      float dot = 0.f;
      for (int64_t c = 0; c < s.d; ++c) dot += scalar(q + r * qs + c) * scalar(k + j * ks + c);
      sc[r * stride + j] = dot * scale * LOG2E + (brows[r] ? brows[r][j] * LOG2E : 0.f);
    }
    float m = NEG_INF;
    for (int64_t j = 0; j < s.nk; ++j) m = sc[r * stride + j] > m ? sc[r * stride + j] : m;
    mx[r] = m == NEG_INF ? 0.f : m;
  }
}

template <typename T>
void attend_head(const T* q, int64_t qs, const T* k, int64_t ks, const T* v, int64_t vs,
                 const float* bias, int64_t bi, float scale, const Dims& s, T* out, int64_t os) {
  Head h;
  pack_head(k, ks, v, vs, s, h);
  const int64_t stride = s.nkb * L;
  std::vector<uint32_t> qp(MR * s.d4), pp(MR * s.nk4 + L);
  std::vector<float> sc(MR * stride);
  for (int64_t i0 = 0; i0 < s.nq; i0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, s.nq - i0));
    for (int64_t i = i0 + MR; i < std::min<int64_t>(i0 + 2 * MR, s.nq); ++i) prefetch_row(q + i * qs, s.d * sizeof(T));
    float qscale[MR];
    for (int r = 0; r < MR; ++r) {
      uint8_t* dst = reinterpret_cast<uint8_t*>(qp.data() + r * s.d4);
      if (r >= rows) {
        std::memset(dst, 0, s.d4 * 4);
        qscale[r] = 0.f;
        continue;
      }
      qscale[r] = quantize_row<true>(q + (i0 + r) * qs, s.d, dst, nullptr) * (scale * LOG2E);
    }
    const float* brows[MR];
    for (int r = 0; r < MR; ++r) brows[r] = bias && r < rows ? bias + (i0 + r) * bi : nullptr;
    float mx[MR], inv[MR];
    logits_block(qp.data(), qscale, brows, h, s, sc.data(), mx);
    if (!h.nonfinite.empty()) exact_logits(q + i0 * qs, qs, k, ks, brows, scale, h, s, rows, sc.data(), mx);
    for (int r = 0; r < MR; ++r) {
      float* row = sc.data() + r * stride;
      uint8_t* prow = reinterpret_cast<uint8_t*>(pp.data() + r * s.nk4);
      if (r >= rows) {
        std::memset(prow, 0, s.nk4 * 4);
        inv[r] = 0.f;
        continue;
      }
      // probabilities as u8 (255 = the row max: 2^(x - max + log2 255), logits in base 2), normalised by
      // the sum of the unrounded values: with v centred, what rounds away is given the mean of v (see pack_head)
      const __m512 vm = _mm512_set1_ps(mx[r] - 7.99435343685886f);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < stride; j += L) {
        const __m512 e = exp2_16(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm));
        vsum = _mm512_add_ps(vsum, e);  // NaN if any e is NaN
        const __m512i p = _mm512_cvtps_epi32(e);
        const int64_t n = std::min<int64_t>(L, s.nk4 * 4 - j);
        if (n == L)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(prow + j), _mm512_cvtusepi32_epi8(p));
        else if (n > 0)
          _mm_mask_storeu_epi8(prow + j, static_cast<__mmask16>(lanes(n)), _mm512_cvtusepi32_epi8(p));
      }
      inv[r] = normaliser(_mm512_reduce_add_ps(vsum));
    }
    pv_rows(pp.data(), h, s, inv, out + i0 * os, os, rows);
  }
}

}  // namespace i8
#endif  // MERGEPASS_INT8_ATTENTION

// ---------------------------------------------------------------------------------------------------
#ifdef MERGEPASS_INT16_ATTENTION
namespace i16 {

// AVX2 has no int8 dot product that sums 8-bit pairs without 16-bit saturation, but vpmaddwd sums int16
// pairs into int32 exactly: twice the multiply-adds of an fp32 FMA per instruction. Operands get as many
// bits as the int32 sums allow (q kᵀ over d, p v over the keys), 10-13 bits at ViT sizes, so the op keeps
// SDPA's numerics far more closely than int8 does.
constexpr int MR = 4;  // query rows per block
constexpr int W = 8;   // int32 / fp32 lanes per ymm
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr float LOG2E = 1.44269504088896341f;

// The largest m (at most 32767) with m * m * n <= INT32_MAX: n products of int16 operands within +-m sum
// in int32 without overflow, vpmaddwd's pair sums included.
inline int32_t magnitude(int64_t n) {
  n = std::max<int64_t>(n, 2);
  int64_t m = std::min<int64_t>(32767, static_cast<int64_t>(std::sqrt(2147483647.0 / static_cast<double>(n))));
  while (m * m * n > 2147483647) --m;  // sqrt may round up
  return static_cast<int32_t>(m);
}

// The probabilities' magnitude for p v over n keys: of the product the int32 sums allow (mp * mv * n <= INT32_MAX),
// p gets about 8 times the range of v: it loses more to rounding than v does (its small values are many)
inline int32_t p_magnitude(int64_t n) {
  n = std::max<int64_t>(n, 2);
  const int64_t product = 2147483647 / n;
  int64_t m = std::min<int64_t>(32767, static_cast<int64_t>(std::sqrt(8.0 * static_cast<double>(product))));
  while (m * m > 8 * product) --m;  // sqrt may round up
  return static_cast<int32_t>(m);
}

inline bool finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }
inline float hmax(__m256 v) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}
inline float hsum(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
// lanes [0, n) set (n clamped to [0, 8])
inline __m256i valid(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(std::max<int64_t>(n, 0), W))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 2^t for t <= 0 (softmax in base 2 after the row max is subtracted): t below -126 gives 0. The
// polynomial of exp2_16; 2^n written into the exponent bits (AVX2 has no vscalefps).
inline __m256 exp2_8(__m256 t) {
  const __m256 lo = _mm256_set1_ps(-126.f);
  const __m256 tiny = _mm256_cmp_ps(t, lo, _CMP_LT_OQ);
  t = _mm256_max_ps(t, lo);
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.326697064e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.675459936e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550742522e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402212173e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931469440e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.000000119e+0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline uint32_t pair(int16_t lo, int16_t hi) {
  return static_cast<uint32_t>(static_cast<uint16_t>(lo)) | (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
}
inline int16_t to16(float x, float inv, int32_t m) {
  const float r = std::nearbyint(x * inv);
  return static_cast<int16_t>(std::max<float>(-m, std::min<float>(m, r)));
}

// Symmetric int16 (within +-m) of n floats minus centre (or as they are), written to out[0, width) (zero
// padded); returns the scale (max |x| / m; 1 for an all-zero row), NaN for a row holding NaN or inf.
inline float quantize_row(const float* x, int64_t n, const float* centre, int32_t m, int16_t* out, int64_t width) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  auto at = [&](int64_t i) { return centre ? _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(centre + i)) : _mm256_loadu_ps(x + i); };
  auto one = [&](int64_t i) { return x[i] - (centre ? centre[i] : 0.f); };
  __m256 vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const __m256 a = _mm256_and_ps(at(i), abs_mask);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_NLE_UQ));
    vmax = _mm256_max_ps(vmax, a);
  }
  float amax = hmax(vmax);
  bool spoilt = _mm256_movemask_ps(bad) != 0;
  for (int64_t t = i; t < n; ++t) {
    const float a = std::fabs(one(t));
    spoilt |= !finite(a);
    amax = std::max(amax, a);
  }
  if (spoilt) return std::numeric_limits<float>::quiet_NaN();
  const float sc = amax > 0.f ? amax / static_cast<float>(m) : 1.f;
  const float inv = 1.f / sc;
  const __m256i hi = _mm256_set1_epi32(m), lo = _mm256_set1_epi32(-m);
  for (i = 0; i + W <= n; i += W) {
    __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(at(i), _mm256_set1_ps(inv)));  // nearest even, as nearbyint
    r = _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; i < n; ++i) out[i] = to16(one(i), inv, m);
  for (; i < width; ++i) out[i] = 0;
  return sc;
}

// The mean over n rows of x (row stride xs) of each of the first `width` channels, into out (padded to 8; 0 past width)
inline void channel_means(const float* x, int64_t xs, int64_t n, int64_t width, float* out) {
  const __m256 inv = _mm256_set1_ps(1.f / static_cast<float>(n));
  for (int64_t c = 0; c < width; c += 2 * W) {  // two blocks at once: two independent add chains
    const __m256i m0 = valid(width - c), m1 = valid(width - c - W);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      a0 = _mm256_add_ps(a0, _mm256_maskload_ps(x + j * xs + c, m0));
      a1 = _mm256_add_ps(a1, _mm256_maskload_ps(x + j * xs + c + W, m1));
    }
    _mm256_storeu_ps(out + c, _mm256_mul_ps(a0, inv));
    if (c + W < width) _mm256_storeu_ps(out + c + W, _mm256_mul_ps(a1, inv));
  }
}

struct Shape {
  int64_t nq, nk, d, dv;
  int64_t d2, nkb, nk2, dvb, stride;  // d pairs, key blocks of 8, key pairs, dv blocks of 8, score row length
  int32_t mqk, mp, mv;               // operand magnitudes: q and k; probabilities; v
  explicit Shape(const Dims& s)
      : nq(s.nq), nk(s.nk), d(s.d), dv(s.dv), d2((s.d + 1) / 2), nkb((s.nk + W - 1) / W), nk2((s.nk + 1) / 2),
        dvb((s.dv + W - 1) / W), stride(nkb * W), mqk(magnitude(d2 * 2)), mp(p_magnitude(nk2 * 2)),
        mv(static_cast<int32_t>(std::min<int64_t>(32767, 2147483647 / (int64_t{mp} * nk2 * 2)))) {}
};

struct Head {
  std::vector<uint32_t> qq, kq, vq;  // qq[row][d pair]; kq[key block][d pair][8 keys]; vq[key pair][dv block][8 dims]
  std::vector<float> qscale, kscale, vscale, vmean;
};

// Quantizes one head; false when q, k or v holds inf or NaN (the head is then computed exactly).
bool pack_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs, float scale,
               const Shape& s, Head& h) {
  const int64_t rows = (s.nq + MR - 1) / MR * MR;
  std::vector<int16_t> row(std::max(s.d2 * 2, s.nk2 * 2) + W);
  h.qq.assign(rows * s.d2, 0u);
  h.qscale.assign(rows, 0.f);
  for (int64_t i = 0; i < s.nq; ++i) {
    const float sc = quantize_row(q + i * qs, s.d, nullptr, s.mqk, row.data(), s.d2 * 2);
    if (std::isnan(sc)) return false;
    h.qscale[i] = sc * scale * LOG2E;
    std::memcpy(h.qq.data() + i * s.d2, row.data(), s.d2 * sizeof(uint32_t));  // int16 pairs, low first
  }
  // k centred on its mean over the keys: softmax ignores q . mean(k), and centred rows quantize finer
  std::vector<float> kmean((s.d + W - 1) / W * W, 0.f);
  std::vector<float>& vmean = h.vmean;
  vmean.assign(s.dvb * W, 0.f);
  channel_means(k, ks, s.nk, s.d, kmean.data());
  channel_means(v, vs, s.nk, s.dv, vmean.data());
  for (int64_t c = 0; c < s.d; ++c)
    if (!finite(kmean[c])) return false;
  for (int64_t c = 0; c < s.dv; ++c)
    if (!finite(vmean[c])) return false;
  h.kq.assign(s.nkb * s.d2 * W, 0u);
  h.kscale.assign(s.nkb * W, 0.f);
  for (int64_t j = 0; j < s.nk; ++j) {
    h.kscale[j] = quantize_row(k + j * ks, s.d, kmean.data(), s.mqk, row.data(), s.d2 * 2);
    if (std::isnan(h.kscale[j])) return false;
    uint32_t* dst = h.kq.data() + (j / W) * s.d2 * W + j % W;
    for (int64_t t = 0; t < s.d2; ++t) dst[t * W] = pair(row[2 * t], row[2 * t + 1]);
  }
  // v centred too (its mean is added back to every output row), one scale per channel over the keys: with the
  // normaliser taken from the unrounded probabilities, what rounds away is given the mean of v
  h.vscale.assign(s.dvb * W, 1.f);
  std::vector<float> inv(s.dvb * W, 0.f), vmax(s.dvb * W, 0.f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  auto centred = [&](int64_t j, int64_t c0) {  // v[j][c0, c0 + 8) - mean, lanes past dv 0
    return _mm256_sub_ps(_mm256_maskload_ps(v + j * vs + c0, valid(s.dv - c0)), _mm256_loadu_ps(vmean.data() + c0));
  };
  for (int64_t j = 0; j < s.nk; ++j)
    for (int64_t db = 0; db < s.dvb; ++db) {
      float* mx = vmax.data() + db * W;
      _mm256_storeu_ps(mx, _mm256_max_ps(_mm256_loadu_ps(mx), _mm256_and_ps(centred(j, db * W), abs_mask)));
    }
  for (int64_t c = 0; c < s.dv; ++c) {
    h.vscale[c] = vmax[c] > 0.f ? vmax[c] / static_cast<float>(s.mv) : 1.f;
    inv[c] = 1.f / h.vscale[c];
  }
  h.vq.assign(s.nk2 * s.dvb * W, 0u);
  const __m256i hi = _mm256_set1_epi32(s.mv), lo = _mm256_set1_epi32(-s.mv), low16 = _mm256_set1_epi32(0xFFFF);
  auto q16 = [&](int64_t j, int64_t c0) {
    const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(centred(j, c0), _mm256_loadu_ps(inv.data() + c0)));
    return _mm256_max_epi32(_mm256_min_epi32(r, hi), lo);
  };
  for (int64_t u = 0; u < s.nk2; ++u)
    for (int64_t db = 0; db < s.dvb; ++db) {
      const __m256i a = q16(2 * u, db * W);
      const __m256i b = 2 * u + 1 < s.nk ? q16(2 * u + 1, db * W) : _mm256_setzero_si256();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h.vq.data() + (u * s.dvb + db) * W),
                          _mm256_or_si256(_mm256_and_si256(a, low16), _mm256_slli_epi32(b, 16)));
    }
  return true;
}

// x, held in a register: otherwise GCC folds each load into every vpmaddwd that reads it, and the loads (one per
// row and block) rather than the multiplies bound the dot products
inline __m256i in_register(__m256i x) {
#if defined(__GNUC__)
  asm("" : "+x"(x));
#endif
  return x;
}

// acc + a . b over int16 pairs (vpmaddwd, exact in int32)
inline __m256i madd(__m256i acc, __m256i a, __m256i b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }

// The base-2 logits of MR query rows (from row i0) against NB key blocks from jb, bias added, keys past nk at -inf
template <int NB>
MERGEPASS_DOT_KERNEL void logits_blocks(const Head& h, const Shape& s, int64_t i0, const float* const* brows, int64_t jb,
                                        float* sc, __m256* vmax) {
  __m256i acc[MR][NB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm256_setzero_si256();
  const uint32_t* qp = h.qq.data() + i0 * s.d2;
  const uint32_t* k0 = h.kq.data() + jb * s.d2 * W;
  for (int64_t t = 0; t < s.d2; ++t) {
    __m256i b[NB];
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) b[c] = in_register(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k0 + (c * s.d2 + t) * W)));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256i a = _mm256_set1_epi32(static_cast<int>(qp[r * s.d2 + t]));
#pragma GCC unroll 16
      for (int c = 0; c < NB; ++c) acc[r][c] = madd(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NB; ++c) {
    const int64_t j = (jb + c) * W;
    const __m256i m = valid(s.nk - j);
    const __m256 ksc = _mm256_loadu_ps(h.kscale.data() + j);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m256 x = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][c]), ksc), _mm256_set1_ps(h.qscale[i0 + r]));
      if (brows[r]) x = _mm256_fmadd_ps(_mm256_maskload_ps(brows[r] + j, m), _mm256_set1_ps(LOG2E), x);
      x = _mm256_blendv_ps(_mm256_set1_ps(NEG_INF), x, _mm256_castsi256_ps(m));
      _mm256_storeu_ps(sc + r * s.stride + j, x);
      vmax[r] = _mm256_max_ps(vmax[r], x);
    }
  }
}

// out rows = (p16 . v16) * v scale * inv + mean(v) for DB dv blocks from db0 (inv: 1 / (the unrounded sum * mp))
template <int DB>
MERGEPASS_DOT_KERNEL void pv_block(const uint32_t* pp, const Head& h, const Shape& s, int64_t db0, const float* inv,
                                   float* out, int64_t os, int rows) {
  __m256i acc[MR][DB];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) acc[r][c] = _mm256_setzero_si256();
  for (int64_t u = 0; u < s.nk2; ++u) {
    __m256i b[DB];
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c)
      b[c] = in_register(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h.vq.data() + (u * s.dvb + db0 + c) * W)));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256i a = _mm256_set1_epi32(static_cast<int>(pp[r * s.nk2 + u]));
#pragma GCC unroll 16
      for (int c = 0; c < DB; ++c) acc[r][c] = madd(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    if (r >= rows) break;  // r bounded by MR, not rows: the accumulators stay in registers
#pragma GCC unroll 16
    for (int c = 0; c < DB; ++c) {
      const int64_t c0 = (db0 + c) * W;
      const __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(h.vscale.data() + c0), _mm256_set1_ps(inv[r]));
      // a row with no finite logit (normaliser 0) stays 0
      const __m256 vm = inv[r] != 0.f ? _mm256_loadu_ps(h.vmean.data() + c0) : _mm256_setzero_ps();
      const __m256 y = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][c]), sc, vm);
      if (s.dv - c0 >= W)
        _mm256_storeu_ps(out + r * os + c0, y);
      else
        _mm256_maskstore_ps(out + r * os + c0, valid(s.dv - c0), y);
    }
  }
}

// softmax(scale * q kᵀ + bias) v written out in double: for a head whose q, k, v or bias holds inf or NaN,
// which then reach exactly the outputs the formula sends them to (a row with no finite logit gives 0, as above)
void exact_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs,
                const float* bias, int64_t bi, float scale, const Dims& s, float* out, int64_t os) {
  std::vector<double> e(s.nk), acc(s.dv);
  for (int64_t i = 0; i < s.nq; ++i) {
    bool nan = false;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < s.nk; ++j) {
      double x = 0.0;
      for (int64_t c = 0; c < s.d; ++c) x += static_cast<double>(q[i * qs + c]) * k[j * ks + c];
      x = x * scale + (bias ? bias[i * bi + j] : 0.f);
      nan |= std::isnan(x);
      if (!std::isnan(x)) mx = std::max(mx, x);
      e[j] = x;
    }
    float* o = out + i * os;
    if (nan || mx == std::numeric_limits<double>::infinity()) {
      std::fill(o, o + s.dv, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    if (mx == -std::numeric_limits<double>::infinity()) {
      std::fill(o, o + s.dv, 0.f);
      continue;
    }
    double sum = 0.0;
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t j = 0; j < s.nk; ++j) {
      const double p = std::exp(e[j] - mx);
      sum += p;
      if (p != 0.0)
        for (int64_t c = 0; c < s.dv; ++c) acc[c] += p * v[j * vs + c];
    }
    for (int64_t c = 0; c < s.dv; ++c) o[c] = static_cast<float>(acc[c] / sum);
  }
}

// true when the bias rows of this head hold NaN or +inf (-inf masks a key, and is computed as usual)
bool bias_spoilt(const float* bias, int64_t bi, const Dims& s) {
  if (!bias) return false;
  for (int64_t i = 0; i < (bi ? s.nq : 1); ++i)
    for (int64_t j = 0; j < s.nk; ++j) {
      const float b = bias[i * bi + j];
      if (std::isnan(b) || b == std::numeric_limits<float>::infinity()) return true;
    }
  return false;
}

void attend_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs,
                 const float* bias, int64_t bi, float scale, const Dims& dims, float* out, int64_t os) {
  const Shape s(dims);
  Head h;
  if (bias_spoilt(bias, bi, dims) || !pack_head(q, qs, k, ks, v, vs, scale, s, h))
    return exact_head(q, qs, k, ks, v, vs, bias, bi, scale, dims, out, os);
  std::vector<float> sc(MR * s.stride);
  std::vector<uint32_t> pp(MR * s.nk2 + W);
  const float mp = static_cast<float>(s.mp);
  for (int64_t i0 = 0; i0 < s.nq; i0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, s.nq - i0));
    const float* brows[MR];
    for (int r = 0; r < MR; ++r) brows[r] = bias && r < rows ? bias + (i0 + r) * bi : nullptr;
    __m256 vmax[MR];
    for (int r = 0; r < MR; ++r) vmax[r] = _mm256_set1_ps(NEG_INF);
    in_chunks<2>(s.nkb, [&](auto n, int64_t jb) { logits_blocks<decltype(n)::value>(h, s, i0, brows, jb, sc.data(), vmax); });
    float inv[MR];
    for (int r = 0; r < MR; ++r) {
      const float m = hmax(vmax[r]);
      const __m256 vm = _mm256_set1_ps(m == NEG_INF ? 0.f : m);
      const float* row = sc.data() + r * s.stride;
      int16_t* prow = reinterpret_cast<int16_t*>(pp.data() + r * s.nk2);
      __m256 vsum = _mm256_setzero_ps();
      for (int64_t j = 0; j < s.stride; j += W) {
        const __m256 e = exp2_8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
        vsum = _mm256_add_ps(vsum, e);
        const __m256i p = _mm256_cvtps_epi32(_mm256_mul_ps(e, _mm256_set1_ps(mp)));
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
        const int64_t n = std::min<int64_t>(W, s.nk2 * 2 - j);  // the row holds nk2 pairs: write no further
        if (n == W)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(prow + j), p16);
        else if (n > 0) {
          alignas(16) int16_t tmp[W];
          _mm_store_si128(reinterpret_cast<__m128i*>(tmp), p16);
          std::memcpy(prow + j, tmp, n * sizeof(int16_t));
        }
      }
      const float sum = hsum(vsum);
      inv[r] = r < rows && sum > 0.f ? 1.f / (sum * mp) : 0.f;
    }
    in_chunks<2>(s.dvb, [&](auto n, int64_t db) { pv_block<decltype(n)::value>(pp.data(), h, s, db, inv, out + i0 * os, os, rows); });
  }
}

}  // namespace i16
#endif  // MERGEPASS_INT16_ATTENTION

// ---------------------------------------------------------------------------------------------------
template <typename T>
using HeadFn = void (*)(const T*, int64_t, const T*, int64_t, const T*, int64_t, const float*, int64_t, float,
                        const Dims&, T*, int64_t);

// The output is written as [B, N, H, dv] and returned as its [B, H, N, dv] view: the transpose and reshape
// back to [B, N, H * dv] that follow attention in a ViT are then free views, not a copy.
template <typename T>
at::Tensor run(const char* name, HeadFn<T> head, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const c10::optional<at::Tensor>& bias, double scale, at::ScalarType work) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, name, ": q, k and v must be 4-D [B, H, N, D]");
  TORCH_CHECK(q.is_floating_point() && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              name, ": q, k and v must share one floating dtype");
  TORCH_CHECK(q.device().is_cpu(), name, ": CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), d = q.size(3), nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == d &&
                  v.size(2) == nk,
              name, ": shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(nk > 0 && d > 0 && dv > 0, name, ": empty keys or head dimension");
  // views with unit stride in the head dimension are read in place (q, k, v are usually views of one qkv
  // projection); anything else, or another dtype than the kernel reads, is converted once
  auto rows = [work](const at::Tensor& t) {
    auto f = t.to(work);
    return f.stride(3) == 1 ? f : f.contiguous();
  };
  auto qf = rows(q), kf = rows(k), vf = rows(v);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_floating_point(), name, ": the bias must be a float mask (boolean masks stay on SDPA)");
    bf = bias->to(at::kFloat).expand({B, H, nq, nk});
    if (bf.stride(3) != 1) bf = bf.contiguous();
  }
  auto out = at::empty({B, nq, H, dv}, qf.options()).permute({0, 2, 1, 3});
  if (B * H * nq == 0) return out.to(q.scalar_type());
  Dims s{nq, nk, d, dv, (d + 1) / 2, (nk + L - 1) / L, (nk + 1) / 2, (dv + L - 1) / L, (d + 3) / 4, (nk + 3) / 4};
  const T* qd = static_cast<const T*>(qf.data_ptr());
  const T* kd = static_cast<const T*>(kf.data_ptr());
  const T* vd = static_cast<const T*>(vf.data_ptr());
  const float* bd = bf.defined() ? bf.data_ptr<float>() : nullptr;
  T* od = static_cast<T*>(out.data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* brow = bd ? bd + b * bf.stride(0) + h * bf.stride(1) : nullptr;
      head(qd + b * qf.stride(0) + h * qf.stride(1), qf.stride(2), kd + b * kf.stride(0) + h * kf.stride(1),
           kf.stride(2), vd + b * vf.stride(0) + h * vf.stride(1), vf.stride(2), brow, bd ? bf.stride(2) : 0,
           static_cast<float>(scale), s, od + b * out.stride(0) + h * out.stride(1), out.stride(2));
    }
  });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

at::Tensor bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& bias, double scale) {
#ifdef MERGEPASS_BF16_ATTENTION
  return run<float>("bf16_attention", &bf16::attend_head, q, k, v, bias, scale, at::kFloat);
#else
  TORCH_CHECK(false, "bf16_attention: this build has no AVX512-BF16 (the CPU lacks the instructions)");
#endif
}

at::Tensor int8_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& bias, double scale) {
#ifdef MERGEPASS_INT8_ATTENTION
  // bf16 inputs (an int8 graph whose rest is bf16) are read as they are: no fp32 copies of q, k, v
  if (q.scalar_type() == at::kBFloat16)
    return run<uint16_t>("int8_attention", &i8::attend_head<uint16_t>, q, k, v, bias, scale, at::kBFloat16);
  return run<float>("int8_attention", &i8::attend_head<float>, q, k, v, bias, scale, at::kFloat);
#else
  TORCH_CHECK(false, "int8_attention: this build has no AVX-512 VNNI (the CPU lacks the instructions)");
#endif
}

at::Tensor int16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& bias, double scale) {
#ifdef MERGEPASS_INT16_ATTENTION
  return run<float>("int16_attention", &i16::attend_head, q, k, v, bias, scale, at::kFloat);
#else
  TORCH_CHECK(false, "int16_attention: this build has no AVX2 and FMA (the CPU lacks the instructions)");
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(mergepass, CPU, m) {
  m.impl("bf16_attention", &bf16_attention);
  m.impl("int8_attention", &int8_attention);
  m.impl("int16_attention", &int16_attention);
}
