// Fused bipartite soft matching + size-weighted merge for CPU: one call per merging block.
//
// Computes what mergepass.merge.methods' reference functions compute (global_merge, window_merge,
// adjacent_merge) in one pass per batch element instead of ~15-25 small kernels. On CPU those
// kernels, not the arithmetic, are most of a merge's cost in a compiled int8 ViT.
//
// Tokens are split into G groups (1 for ToMe/ToMato, one per window for LGTM), each with an A set
// and a B set given by token positions (-1: padding, never matched). In every group the r A tokens
// with the most similar B partner (cosine of the metric rows) merge into that partner.
// With `nearest` (one group, soft merging's k = 1), each of those r joins its most similar kept token
// instead, an unmerged A token or a B token; there an A token with no permitted partner (protected) absorbs nothing.
// A pair is permitted unless `allowed` forbids it, the B slot is padding or the similarity is NaN. An A token
// with no permitted partner ranks below every A token with one; when it is still among the r that leave
// (shapes are static), it is dropped: it joins no average, and its source entries point at the group's
// first real B token. Nothing is ever read or written through a padding slot.
// Output token order: the prefix, then per group its unmerged A tokens in A order and its B tokens.
// Each A token's best partner is exact whichever matmul screens the pairs: the matmul's similarities (fp32, or
// with `screen` bf16, about 2.7x as fast on a Zen 5 with AVX512-BF16) only pick the candidates within
// their rounding bound of the row's maximum, and those are scored again by one fp32 dot product. Both ways give
// the same matches bit for bit; which one is faster is measured (mergepass.merge.fused.choose_screen).
// the narrow headers, not <ATen/ATen.h>: a first-use build takes seconds less
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

struct Shape {
  int64_t n, c, d, n0, groups, ma, mb, r, prefix, n_out;
};

// a vectorised dot product (the reduction reordered into SIMD lanes)
float dot(const float* p, const float* q, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < d; ++k) acc += p[k] * q[k];
  return acc;
}

// eight dot products, rows p[0..1] against rows q[0..3] (out[4 a + b]): eight independent accumulator chains, and each
// q row read once for two p rows (the nearest step is bound by reading the kept rows). Eight accumulators and six
// loads fit AVX2's sixteen registers.
void dot2x4(const float* const p[2], const float* const q[4], int64_t d, float out[8]) {
  const float *p0 = p[0], *p1 = p[1], *q0 = q[0], *q1 = q[1], *q2 = q[2], *q3 = q[3];
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
  for (int64_t k = 0; k < d; ++k) {
    const float x = p0[k], y = p1[k], u0 = q0[k], u1 = q1[k], u2 = q2[k], u3 = q3[k];
    a0 += x * u0;
    a1 += x * u1;
    a2 += x * u2;
    a3 += x * u3;
    b0 += y * u0;
    b1 += y * u1;
    b2 += y * u2;
    b3 += y * u3;
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
  out[4] = b0;
  out[5] = b1;
  out[6] = b2;
  out[7] = b3;
}

// Unit-normalised metric rows (zeros for padding); the similarity matmul runs on them.
void normalize_rows(const float* metric, const int64_t* pos, int64_t count, int64_t d, float* out) {
  for (int64_t i = 0; i < count; ++i) {
    float* dst = out + i * d;
    if (pos[i] < 0) {
      std::fill(dst, dst + d, 0.f);
      continue;
    }
    const float* row = metric + pos[i] * d;
    const float inv = 1.f / std::max(std::sqrt(dot(row, row, d)), 1e-12f);
    for (int64_t k = 0; k < d; ++k) dst[k] = row[k] * inv;
  }
}

// Unit rows and similarities, kept per calling thread between calls: fresh pages for them on every call cost more
// than filling them. Tensors, for the allocator's 64-byte alignment; never freed, so no thread exit races the allocator.
struct Scratch {
  at::Tensor na, nb, na16, nb16, scores;
};

Scratch& scratch() {
  thread_local Scratch* sc = new Scratch();
  return *sc;
}

// `buf`'s first elements as a contiguous [groups, m, d] tensor; `buf` grows (never shrinks) to hold them, up to
// 32 MiB: a larger one is allocated for this call only, so a large model leaves no large buffer behind
at::Tensor take(at::Tensor& buf, int64_t groups, int64_t m, int64_t d, at::ScalarType type) {
  const int64_t n = groups * m * d;
  const auto options = at::TensorOptions().dtype(type);
  if (n * static_cast<int64_t>(c10::elementSize(type)) > (int64_t{32} << 20)) return at::empty({groups, m, d}, options);
  if (!buf.defined() || buf.numel() < n) buf = at::empty({std::max<int64_t>(n, 1)}, options);
  return buf.narrow(0, 0, n).view({groups, m, d});
}

// The same unit rows from a bf16 metric, rounded to bf16 (what normalize_rows on its float copy, then a cast,
// gives, without the two copies): `tmp` holds one row in float.
void normalize_rows(const at::BFloat16* metric, const int64_t* pos, int64_t count, int64_t d, at::BFloat16* out,
                    float* tmp) {
  for (int64_t i = 0; i < count; ++i) {
    at::BFloat16* dst = out + i * d;
    if (pos[i] < 0) {
      std::fill(dst, dst + d, at::BFloat16(0.f));
      continue;
    }
    const at::BFloat16* row = metric + pos[i] * d;
    for (int64_t k = 0; k < d; ++k) tmp[k] = static_cast<float>(row[k]);
    const float inv = 1.f / std::max(std::sqrt(dot(tmp, tmp, d)), 1e-12f);
    for (int64_t k = 0; k < d; ++k) dst[k] = at::BFloat16(tmp[k] * inv);
  }
}

// Whether A token i may merge into B slot j: a real B token that `allowed` (when given) permits.
inline bool permitted(const int64_t* b_pos, const bool* allowed, const Shape& s, int64_t i, int64_t j) {
  return b_pos[j] >= 0 && (allowed == nullptr || allowed[i * s.mb + j]);
}

// Exact similarities for the candidates of each A row: the permitted pairs within `margin` of the row's largest
// screened similarity are scored again by dot() on the fp32 unit rows. `margin` is twice the screen's rounding
// bound, so the exact maximum is always among them and every pair left unscored stays below it.
void rescore(float* scores, const float* na, const float* nb, const int64_t* a_pos, const int64_t* b_pos,
             const bool* allowed, const Shape& s, float margin) {
  for (int64_t i = 0; i < s.ma; ++i) {
    if (a_pos[i] < 0) continue;
    float* row = scores + i * s.mb;
    float top = -INFINITY;
    for (int64_t j = 0; j < s.mb; ++j)
      if (permitted(b_pos, allowed, s, i, j) && row[j] > top) top = row[j];
    if (!(top > -INFINITY)) continue;
    const float floor = top - margin;
    for (int64_t j = 0; j < s.mb; ++j)
      if (permitted(b_pos, allowed, s, i, j) && row[j] >= floor) row[j] = dot(na + i * s.d, nb + j * s.d, s.d);
  }
}

template <typename T>
struct Batch {  // one batch element's inputs and outputs
  const T* x;
  const T* size;
  const int64_t* source;
  T* xo;
  T* so;
  int64_t* srco;
};

// Match and merge one group; returns the next free output position. `na`: the group's unit A rows, read
// only when `nearest` (a leaving A token then joins its most similar kept token, unmerged A or B, the
// unmerged A tokens first on a tie: soft merging's k = 1).
template <typename T>
int64_t merge_group(const Batch<T>& io, const float* scores, const float* na, const int64_t* a_pos,
                    const int64_t* b_pos, const bool* allowed, const Shape& s, bool nearest, int64_t out,
                    std::vector<int64_t>& slot) {
  // a partnerless A token's source entries go to the first real B token (the caller checked there is one
  // when r > 0), never to a padding slot
  const int64_t first_b = std::find_if(b_pos, b_pos + s.mb, [](int64_t p) { return p >= 0; }) - b_pos;
  std::vector<float> best(s.ma, -INFINITY);
  std::vector<int64_t> arg(s.ma, std::min(first_b, s.mb - 1)), order;
  order.reserve(s.ma);
  for (int64_t i = 0; i < s.ma; ++i) {
    if (a_pos[i] < 0) continue;
    const float* row = scores + i * s.mb;
    for (int64_t j = 0; j < s.mb; ++j) {  // first maximum wins, as torch.max; NaN never does
      if (permitted(b_pos, allowed, s, i, j) && row[j] > best[i]) {
        best[i] = row[j];
        arg[i] = j;
      }
    }
    order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return best[p] > best[q]; });
  std::vector<char> merged(s.ma, 0);
  for (int64_t k = 0; k < s.r; ++k) merged[order[k]] = 1;
  const int64_t keep = static_cast<int64_t>(order.size()) - s.r;
  std::vector<int64_t> b_out(s.mb, -1);
  int64_t kept_b = 0;
  for (int64_t j = 0; j < s.mb; ++j)
    if (b_pos[j] >= 0) b_out[j] = out + keep + kept_b++;

  // where each leaving A token goes: an input row and its output row (its best B partner unless `nearest`
  // finds an unmerged A token at least as similar)
  std::vector<int64_t> to_in(s.ma, -1), to_out(s.ma, -1), a_out(s.ma, -1), unm;
  for (int64_t i = 0, u = 0; i < s.ma; ++i)
    if (a_pos[i] >= 0 && !merged[i]) {
      a_out[i] = out + u++;
      unm.push_back(i);
    }
  // the kept A tokens a leaving token may join: with `allowed` (protection), only those with a permitted partner
  std::vector<int64_t> hosts;
  for (int64_t i : unm)
    if (allowed == nullptr || best[i] > -INFINITY) hosts.push_back(i);
  const int64_t n_unm = static_cast<int64_t>(hosts.size());
  for (int64_t k = 0; k < s.r; ++k) {
    const int64_t i = order[k];
    to_in[i] = b_pos[arg[i]];
    to_out[i] = b_out[arg[i]];
  }
  // nearest: two leaving tokens at a time against four unmerged A tokens (a short block repeats its last row)
  const int64_t stride = n_unm + 3;
  std::vector<float> sims(nearest ? 2 * stride : 0);
  for (int64_t k = 0; nearest && k < s.r; k += 2) {
    const int64_t pair[2] = {order[k], order[std::min(k + 1, s.r - 1)]};
    const float* p[2] = {na + pair[0] * s.d, na + pair[1] * s.d};
    for (int64_t u = 0; u < n_unm; u += 4) {
      const float* q[4];
      float out[8];
      for (int64_t t = 0; t < 4; ++t) q[t] = na + hosts[std::min(u + t, n_unm - 1)] * s.d;
      dot2x4(p, q, s.d, out);
      for (int64_t t = 0; t < 4; ++t) {
        sims[u + t] = out[t];
        sims[stride + u + t] = out[4 + t];
      }
    }
    for (int64_t h = 0; h < 2 && k + h < s.r; ++h) {
      const int64_t i = pair[h];
      const float* row = sims.data() + h * stride;
      float top = -INFINITY;
      int64_t pick = -1;
      for (int64_t u = 0; u < n_unm; ++u) {  // first maximum wins, in A order
        if (row[u] > top) {
          top = row[u];
          pick = hosts[u];
        }
      }
      if (pick >= 0 && top >= best[i]) {
        to_in[i] = a_pos[pick];
        to_out[i] = a_out[pick];
      }
    }
  }

  auto copy_row = [&](int64_t from, int64_t to) {
    std::copy(io.x + from * s.c, io.x + (from + 1) * s.c, io.xo + to * s.c);
    io.so[to] = io.size[from];
    slot[from] = to;
  };
  for (int64_t i = 0; i < s.ma; ++i) {
    if (a_pos[i] < 0) continue;
    if (merged[i]) slot[a_pos[i]] = to_out[i];
    else copy_row(a_pos[i], a_out[i]);
  }
  for (int64_t j = 0; j < s.mb; ++j)
    if (b_pos[j] >= 0) copy_row(b_pos[j], b_out[j]);

  // each row that absorbs tokens becomes the size-weighted mean of itself and them, accumulated in
  // float for reduced-precision inputs (bf16, fp16) and written back once
  using acc_t = at::opmath_type<T>;
  std::vector<int64_t> acc_of(s.n, -1), acc_row;
  std::vector<acc_t> acc, acc_size;
  auto joins = [&](int64_t i) { return best[i] > -INFINITY; };  // has a permitted partner
  for (int64_t k = 0; k < s.r; ++k) {
    const int64_t i = order[k], p = to_in[i];
    if (!joins(i) || acc_of[p] >= 0) continue;
    acc_of[p] = static_cast<int64_t>(acc_size.size());
    acc_row.push_back(to_out[i]);
    const T* xd = io.x + p * s.c;
    const acc_t sd = static_cast<acc_t>(io.size[p]);
    for (int64_t c = 0; c < s.c; ++c) acc.push_back(static_cast<acc_t>(xd[c]) * sd);
    acc_size.push_back(sd);
  }
  for (int64_t k = 0; k < s.r; ++k) {
    const int64_t i = order[k];
    if (!joins(i)) continue;
    const int64_t h = acc_of[to_in[i]];
    acc_t* __restrict__ row = acc.data() + h * s.c;
    const T* __restrict__ xa = io.x + a_pos[i] * s.c;
    const acc_t sa = static_cast<acc_t>(io.size[a_pos[i]]);
    for (int64_t c = 0; c < s.c; ++c) row[c] += static_cast<acc_t>(xa[c]) * sa;
    acc_size[h] += sa;
  }
  for (size_t h = 0; h < acc_row.size(); ++h) {
    T* __restrict__ out_row = io.xo + acc_row[h] * s.c;
    const acc_t* __restrict__ row = acc.data() + h * s.c;
    const acc_t inv = acc_t(1) / acc_size[h];
    for (int64_t c = 0; c < s.c; ++c) out_row[c] = static_cast<T>(row[c] * inv);
    io.so[acc_row[h]] = static_cast<T>(acc_size[h]);
  }
  return out + keep + kept_b;
}

template <typename T>
void merge_batch(const Batch<T>& io, float* scores, const float* na, const float* nb, const int64_t* a_pos,
                 const int64_t* b_pos, const bool* allowed, const Shape& s, bool nearest, float margin) {
  std::vector<int64_t> slot(s.n, -1);
  for (int64_t t = 0; t < s.prefix; ++t) {
    std::copy(io.x + t * s.c, io.x + (t + 1) * s.c, io.xo + t * s.c);
    io.so[t] = io.size[t];
    slot[t] = t;
  }
  int64_t out = s.prefix;
  for (int64_t g = 0; g < s.groups; ++g) {
    if (margin >= 0)
      rescore(scores + g * s.ma * s.mb, na + g * s.ma * s.d, nb + g * s.mb * s.d, a_pos + g * s.ma, b_pos + g * s.mb,
              allowed, s, margin);
    out = merge_group(io, scores + g * s.ma * s.mb, na + g * s.ma * s.d, a_pos + g * s.ma, b_pos + g * s.mb, allowed,
                      s, nearest, out, slot);
  }
  for (int64_t t = 0; t < s.n0; ++t) io.srco[t] = slot[io.source[t]];
}

// a_pos [Bp, G, Ma], b_pos [Bp, G, Mb] with Bp in {1, B}; allowed [Ma, Mb], [B, Ma, Mb] or undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bipartite_merge(
    const at::Tensor& x_, const at::Tensor& metric_, const at::Tensor& size_, const at::Tensor& source_,
    const at::Tensor& a_pos_, const at::Tensor& b_pos_, const c10::optional<at::Tensor>& allowed_, int64_t r,
    int64_t prefix, bool nearest, bool screen) {
  TORCH_CHECK(x_.dim() == 3 && metric_.dim() == 3 && size_.dim() == 3 && source_.dim() == 2,
              "bipartite_merge: expected x [B,N,C], metric [B,N,D], size [B,N,1], source [B,N0]");
  TORCH_CHECK(a_pos_.dim() == 3 && b_pos_.dim() == 3 && a_pos_.size(1) == b_pos_.size(1),
              "bipartite_merge: expected a_pos [B|1, G, Ma] and b_pos [B|1, G, Mb]");
  for (const auto* t : {&x_, &metric_, &size_, &source_, &a_pos_, &b_pos_})
    TORCH_CHECK(t->device().is_cpu(), "bipartite_merge: every input must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()) && at::isFloatingType(metric_.scalar_type()) &&
                  at::isFloatingType(size_.scalar_type()),
              "bipartite_merge: x, metric and size must be floating point, got ", x_.scalar_type(), ", ",
              metric_.scalar_type(), ", ", size_.scalar_type());
  TORCH_CHECK(!at::isFloatingType(source_.scalar_type()) && !at::isFloatingType(a_pos_.scalar_type()) &&
                  !at::isFloatingType(b_pos_.scalar_type()),
              "bipartite_merge: source, a_pos and b_pos must be integer tensors");
  {
    const int64_t b = x_.size(0), n = x_.size(1);
    TORCH_CHECK(metric_.size(0) == b && metric_.size(1) == n, "bipartite_merge: metric must be [", b, ", ", n,
                ", D], got ", metric_.sizes());
    TORCH_CHECK(size_.size(0) == b && size_.size(1) == n && size_.size(2) == 1, "bipartite_merge: size must be [",
                b, ", ", n, ", 1], got ", size_.sizes());
    TORCH_CHECK(source_.size(0) == b, "bipartite_merge: source must have the batch size ", b, ", got ",
                source_.sizes());
    TORCH_CHECK((a_pos_.size(0) == 1 || a_pos_.size(0) == b) && (b_pos_.size(0) == 1 || b_pos_.size(0) == b),
                "bipartite_merge: a_pos and b_pos must have batch size 1 or ", b);
    TORCH_CHECK(prefix >= 0 && prefix <= n, "bipartite_merge: prefix ", prefix, " outside [0, ", n, "]");
    if (source_.numel()) {
      const auto lo = source_.min().item<int64_t>(), hi = source_.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < n, "bipartite_merge: source values must index the ", n, " tokens, got [", lo,
                  ", ", hi, "]");
    }
    if (size_.numel())
      TORCH_CHECK(size_.min().item<double>() > 0, "bipartite_merge: every token size must be > 0");
  }
  const auto x = x_.contiguous();
  // nearest compares wide tokens (the block's own, not 64-channel keys): in a bf16 graph the similarity runs in
  // bf16 as the reference ops' does, a third of the fp32 matmul's time, on unit rows made from the bf16 metric
  // directly; the A-to-A dots then read the same bf16-rounded unit rows
  const bool wide_bf16 = nearest && metric_.scalar_type() == at::kBFloat16;
  const auto metric = wide_bf16 ? metric_.contiguous() : metric_.to(at::kFloat).contiguous();
  const auto size = size_.to(x.scalar_type()).contiguous();
  const auto source = source_.to(at::kLong).contiguous();
  const int64_t bsz = x.size(0);
  const auto a_pos = a_pos_.to(at::kLong).expand({bsz, -1, -1}).contiguous();
  const auto b_pos = b_pos_.to(at::kLong).expand({bsz, -1, -1}).contiguous();
  at::Tensor allowed;
  if (allowed_.has_value()) allowed = allowed_->to(at::kBool).contiguous();
  Shape s{x.size(1), x.size(2), metric.size(2), source.size(1), a_pos.size(1), a_pos.size(2), b_pos.size(2),
          r, prefix, 0};
  TORCH_CHECK(s.mb > 0 && r >= 0, "bipartite_merge: need a non-empty B set and r >= 0");
  TORCH_CHECK(!allowed.defined() || (allowed.dim() == 2 && allowed.size(0) == s.ma && allowed.size(1) == s.mb) ||
                  (allowed.dim() == 3 && allowed.size(0) == bsz && allowed.size(1) == s.ma && allowed.size(2) == s.mb),
              "bipartite_merge: allowed must be [Ma, Mb] or [B, Ma, Mb], got ", allowed.sizes());
  TORCH_CHECK(!nearest || s.groups == 1, "bipartite_merge: nearest takes one group");
  const int64_t allowed_stride = allowed.defined() && allowed.dim() == 3 ? s.ma * s.mb : 0;
  // every mergeable token must sit in exactly one set, and every group must have r A tokens to merge
  for (int64_t bg = 0; bg < bsz * s.groups; ++bg) {
    const int64_t* ap = a_pos.data_ptr<int64_t>() + bg * s.ma;
    const int64_t* bp = b_pos.data_ptr<int64_t>() + bg * s.mb;
    const int64_t va = std::count_if(ap, ap + s.ma, [](int64_t p) { return p >= 0; });
    const int64_t vb = std::count_if(bp, bp + s.mb, [](int64_t p) { return p >= 0; });
    TORCH_CHECK(va >= r, "bipartite_merge: r = ", r, " exceeds a group's ", va, " A tokens");
    TORCH_CHECK(r == 0 || vb > 0, "bipartite_merge: a group with merges has no B token to merge into");
  }
  for (int64_t b = 0; b < bsz; ++b) {
    std::vector<char> seen(s.n, 0);
    for (const auto* t : {&a_pos, &b_pos}) {
      const int64_t len = s.groups * t->size(2);
      const int64_t* p = t->data_ptr<int64_t>() + b * len;
      for (int64_t i = 0; i < len; ++i) {
        if (p[i] < 0) continue;
        TORCH_CHECK(p[i] >= prefix && p[i] < s.n && !seen[p[i]],
                    "bipartite_merge: A/B positions must be distinct tokens after the prefix");
        seen[p[i]] = 1;
      }
    }
    TORCH_CHECK(std::count(seen.begin(), seen.end(), 1) == s.n - prefix,
                "bipartite_merge: prefix + |A| + |B| must equal the token count");
  }
  s.n_out = s.n - r * s.groups;
  const bool* allowed_p = allowed.defined() ? allowed.data_ptr<bool>() : nullptr;

  const bool half = wide_bf16 || screen;  // the matmul runs on bf16 rows
  Scratch& sc = scratch();
  const int64_t bg = bsz * s.groups;
  const at::Tensor na = take(sc.na, bg, s.ma, s.d, at::kFloat);
  const at::Tensor nb = wide_bf16 ? at::Tensor() : take(sc.nb, bg, s.mb, s.d, at::kFloat);
  const at::Tensor na16 = half ? take(sc.na16, bg, s.ma, s.d, at::kBFloat16) : at::Tensor();
  const at::Tensor nb16 = half ? take(sc.nb16, bg, s.mb, s.d, at::kBFloat16) : at::Tensor();
  at::Tensor scores = take(sc.scores, bg, s.ma, s.mb, at::kFloat);
  at::parallel_for(0, bsz, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(wide_bf16 ? s.d : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* ap = a_pos.data_ptr<int64_t>() + b * s.groups * s.ma;
      const int64_t* bp = b_pos.data_ptr<int64_t>() + b * s.groups * s.mb;
      const int64_t oa = b * s.groups * s.ma * s.d, ob = b * s.groups * s.mb * s.d;
      if (wide_bf16) {
        const at::BFloat16* mp = metric.data_ptr<at::BFloat16>() + b * s.n * s.d;
        normalize_rows(mp, ap, s.groups * s.ma, s.d, na16.data_ptr<at::BFloat16>() + oa, tmp.data());
        normalize_rows(mp, bp, s.groups * s.mb, s.d, nb16.data_ptr<at::BFloat16>() + ob, tmp.data());
      } else {
        const float* mp = metric.data_ptr<float>() + b * s.n * s.d;
        normalize_rows(mp, ap, s.groups * s.ma, s.d, na.data_ptr<float>() + oa);
        normalize_rows(mp, bp, s.groups * s.mb, s.d, nb.data_ptr<float>() + ob);
      }
    }
  });
  // the screen's rounding bound on unit rows (Cauchy-Schwarz): bf16 inputs and output, 2u + u^2 and u(1 + u)^2 with
  // u = 2^-8; fp32 sums, d 2^-24 for the matmul and again for dot(); a bf16 graph's own metric is not rescored
  const double d_eps = static_cast<double>(s.d) * std::ldexp(1.0, -24) * 1.01;
  const double u = std::ldexp(1.0, -8);
  const float margin = wide_bf16 ? -1.f
                       : static_cast<float>(2.0 * ((screen ? 3.0 * u + 3.0 * u * u : 0.0) + 2.0 * d_eps) + 1e-6);
  if (screen && !wide_bf16) {  // torch's vectorised rounding, into the kept buffers
    na16.copy_(na);
    nb16.copy_(nb);
  }
  if (half) {
    scores.copy_(at::bmm(na16, nb16.transpose(1, 2)));
  } else {
    at::bmm_out(scores, na, nb.transpose(1, 2));
  }
  if (wide_bf16) na.copy_(na16);  // the nearest step reads fp32 rows

  auto xo = at::empty({bsz, s.n_out, s.c}, x.options());
  auto so = at::empty({bsz, s.n_out, 1}, x.options());
  auto srco = at::empty({bsz, s.n0}, source.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bipartite_merge", [&] {
    at::parallel_for(0, bsz, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        Batch<scalar_t> io{x.data_ptr<scalar_t>() + b * s.n * s.c, size.data_ptr<scalar_t>() + b * s.n,
                           source.data_ptr<int64_t>() + b * s.n0, xo.data_ptr<scalar_t>() + b * s.n_out * s.c,
                           so.data_ptr<scalar_t>() + b * s.n_out, srco.data_ptr<int64_t>() + b * s.n0};
        merge_batch(io, scores.data_ptr<float>() + b * s.groups * s.ma * s.mb,
                    na.data_ptr<float>() + b * s.groups * s.ma * s.d,
                    wide_bf16 ? nullptr : nb.data_ptr<float>() + b * s.groups * s.mb * s.d,
                    a_pos.data_ptr<int64_t>() + b * s.groups * s.ma, b_pos.data_ptr<int64_t>() + b * s.groups * s.mb,
                    allowed_p == nullptr ? nullptr : allowed_p + b * allowed_stride, s, nearest, margin);
      }
    });
  });
  return {xo, so, srco};
}

}  // namespace

TORCH_LIBRARY_IMPL(mergepass, CPU, m) { m.impl("bipartite_merge", &bipartite_merge); }
