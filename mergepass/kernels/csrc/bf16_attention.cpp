// Attention for x86 CPUs with AVX512-BF16 and no AMX: softmax(scale * q kᵀ + bias) v in one pass
// per (batch, head), with bf16 dot products (vdpbf16ps, fp32 accumulation) for q kᵀ and p v and an
// fp32 softmax with a vectorised exp.
//
// torch's CPU flash attention runs fp32 micro-GEMMs here; its bf16 variant goes through cpublas,
// which without AMX is no faster. This kernel packs k and v of one head into bf16 pairs once, then
// walks the queries MR rows at a time: a row block of scores, its softmax, and its share of the output.
//
// Layouts (bf16 pairs are stored as one uint32 each, the layout vdpbf16ps consumes):
//   kp[key block of 16][d pair][16 keys]   -- one zmm per (key block, d pair)
//   vp[key pair][dv block of 16][16 dims]  -- one zmm per (key pair, dv block)
//   qp[row][d pair], pp[row][key pair]     -- broadcast one pair at a time
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define MERGEPASS_BF16_ATTENTION 1
#endif

namespace {

#ifdef MERGEPASS_BF16_ATTENTION

constexpr int MR = 4;  // query rows per block
constexpr int L = 16;  // fp32 lanes per zmm

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

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

struct Dims {
  int64_t nq, nk, d, dv;
  int64_t d2, nkb, nk2, dvb;  // d pairs, key blocks of 16, key pairs, dv blocks of 16
};

// k [nk, d] (fp32, row stride ks) -> kp
void pack_k(const float* k, int64_t ks, const Dims& s, uint32_t* kp) {
  for (int64_t jb = 0; jb < s.nkb; ++jb)
    for (int64_t t = 0; t < s.d2; ++t)
      for (int64_t l = 0; l < L; ++l) {
        const int64_t j = jb * L + l, a = 2 * t, b = 2 * t + 1;
        const float lo = (j < s.nk && a < s.d) ? k[j * ks + a] : 0.f;
        const float hi = (j < s.nk && b < s.d) ? k[j * ks + b] : 0.f;
        kp[(jb * s.d2 + t) * L + l] = pack_pair(lo, hi);
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
void scores_block(const uint32_t* qp, const uint32_t* kp, const Dims& s, float* sc) {
  const int64_t stride = s.nkb * L;
  int64_t jb = 0;
  for (; jb + 2 <= s.nkb; jb += 2) {
    __m512 acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + jb * s.d2 * L;
    const uint32_t* k1 = k0 + s.d2 * L;
    for (int64_t t = 0; t < s.d2; ++t) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + t * L));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(k1 + t * L));
      for (int r = 0; r < MR; ++r) {
        const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(qp[r * s.d2 + t])));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      }
    }
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(sc + r * stride + jb * L, acc[r][0]);
      _mm512_storeu_ps(sc + r * stride + (jb + 1) * L, acc[r][1]);
    }
  }
  for (; jb < s.nkb; ++jb) {
    __m512 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + jb * s.d2 * L;
    for (int64_t t = 0; t < s.d2; ++t) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(k0 + t * L));
      for (int r = 0; r < MR; ++r)
        acc[r] = _mm512_dpbf16_ps(acc[r], as_bh(_mm512_set1_epi32(static_cast<int>(qp[r * s.d2 + t]))), b0);
    }
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(sc + r * stride + jb * L, acc[r]);
  }
}

// out rows += pp . vp for DB dv blocks starting at db0; fp32 accumulators, scaled by inv[r] on store
template <int DB>
void pv_block(const uint32_t* pp, const uint32_t* vp, const Dims& s, int64_t db0, const float* inv, float* out,
              int64_t os, int rows) {
  __m512 acc[MR][DB];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < DB; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t u = 0; u < s.nk2; ++u) {
    __m512bh b[DB];
    for (int c = 0; c < DB; ++c) b[c] = as_bh(_mm512_loadu_si512(vp + (u * s.dvb + db0 + c) * L));
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = as_bh(_mm512_set1_epi32(static_cast<int>(pp[r * s.nk2 + u])));
      for (int c = 0; c < DB; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 scale = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < DB; ++c) {
      const int64_t c0 = (db0 + c) * L;
      const int64_t left = s.dv - c0;
      const __mmask16 m = left >= L ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(out + r * os + c0, m, _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

void pv_rows(const uint32_t* pp, const uint32_t* vp, const Dims& s, const float* inv, float* out, int64_t os,
             int rows) {
  int64_t db = 0;
  for (; db + 4 <= s.dvb; db += 4) pv_block<4>(pp, vp, s, db, inv, out, os, rows);
  switch (s.dvb - db) {
    case 3: pv_block<3>(pp, vp, s, db, inv, out, os, rows); break;
    case 2: pv_block<2>(pp, vp, s, db, inv, out, os, rows); break;
    case 1: pv_block<1>(pp, vp, s, db, inv, out, os, rows); break;
    default: break;
  }
}

// one (batch, head): q [nq, d], k [nk, d], v [nk, dv], bias rows (stride bi per query, or null), out [nq, dv]
void attend_head(const float* q, int64_t qs, const float* k, int64_t ks, const float* v, int64_t vs,
                 const float* bias, int64_t bi, float scale, const Dims& s, float* out, int64_t os) {
  std::vector<uint32_t> kp(s.nkb * s.d2 * L), vp(s.nk2 * s.dvb * L), qp(MR * s.d2), pp(MR * s.nk2);
  std::vector<float> sc(MR * s.nkb * L);
  pack_k(k, ks, s, kp.data());
  pack_v(v, vs, s, vp.data());
  const int64_t stride = s.nkb * L;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t i0 = 0; i0 < s.nq; i0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, s.nq - i0));
    for (int r = 0; r < MR; ++r)
      for (int64_t t = 0; t < s.d2; ++t) {
        const int64_t a = 2 * t, b = 2 * t + 1;
        const float* row = q + (i0 + r) * qs;
        qp[r * s.d2 + t] = r < rows ? pack_pair(row[a], b < s.d ? row[b] : 0.f) : 0u;
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
      // scale and bias; the lanes past nk get -inf so that they drop out of max and sum
      __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < stride; j += L) {
        const int64_t left = s.nk - j;
        const __mmask16 m = left >= L ? static_cast<__mmask16>(0xFFFF)
                                      : left > 0 ? static_cast<__mmask16>((1u << left) - 1) : static_cast<__mmask16>(0);
        __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), vscale);
        if (brow) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, brow + j));
        x = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), m, x);
        _mm512_storeu_ps(row + j, x);
        vmax = _mm512_max_ps(vmax, x);
      }
      float mx = _mm512_reduce_max_ps(vmax);
      if (mx == -std::numeric_limits<float>::infinity()) mx = 0.f;  // a fully masked row: zeros, as 0/0 would not be
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
      inv[r] = sum > 0.f ? 1.f / sum : (std::isnan(sum) ? sum : 0.f);
    }
    pv_rows(pp.data(), vp.data(), s, inv, out + i0 * os, os, rows);
  }
}

#endif  // MERGEPASS_BF16_ATTENTION

at::Tensor bf16_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const c10::optional<at::Tensor>& bias, double scale) {
#ifndef MERGEPASS_BF16_ATTENTION
  TORCH_CHECK(false, "bf16_attention: this build has no AVX512-BF16 (the CPU lacks the instructions)");
#else
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "bf16_attention: q, k and v must be 4-D [B, H, N, D]");
  TORCH_CHECK(q.is_floating_point() && k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "bf16_attention: q, k and v must share one floating dtype");
  TORCH_CHECK(q.device().is_cpu(), "bf16_attention: CPU tensors only");
  const int64_t B = q.size(0), H = q.size(1), nq = q.size(2), d = q.size(3), nk = k.size(2), dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H && k.size(3) == d &&
                  v.size(2) == nk,
              "bf16_attention: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(nk > 0 && d > 0 && dv > 0, "bf16_attention: empty keys or head dimension");
  auto qf = q.to(at::kFloat).contiguous(), kf = k.to(at::kFloat).contiguous(), vf = v.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->is_floating_point(), "bf16_attention: the bias must be a float mask (boolean masks stay on SDPA)");
    bf = bias->to(at::kFloat).expand({B, H, nq, nk});
    if (bf.stride(3) != 1) bf = bf.contiguous();
  }
  auto out = at::empty({B, H, nq, dv}, qf.options());
  if (B * H * nq == 0) return out.to(q.scalar_type());
  Dims s{nq, nk, d, dv, (d + 1) / 2, (nk + L - 1) / L, (nk + 1) / 2, (dv + L - 1) / L};
  const float* qd = qf.data_ptr<float>();
  const float* kd = kf.data_ptr<float>();
  const float* vd = vf.data_ptr<float>();
  const float* bd = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* od = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* brow = bd ? bd + b * bf.stride(0) + h * bf.stride(1) : nullptr;
      attend_head(qd + bh * nq * d, d, kd + bh * nk * d, d, vd + bh * nk * dv, dv, brow, bd ? bf.stride(2) : 0, sc, s,
                  od + bh * nq * dv, dv);
    }
  });
  return out.to(q.scalar_type());
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(mergepass, CPU, m) { m.impl("bf16_attention", &bf16_attention); }
