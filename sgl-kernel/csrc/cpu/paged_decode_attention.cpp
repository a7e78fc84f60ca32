// Decode attention over SGLang's token-paged KV pool, for CPUs.
//
// One query token per request attends to that request's cached tokens, read straight
// from the pool by slot: no gathered copy of K/V, no padding, no mask. The torch
// reference is turbo/kernels.py:paged_decode_attention_ref (gather, mask, softmax).
//
// Why a kernel: in torch, a batch of decode queries over scattered slots needs
// K/V gathered into a padded (batch, longest, heads, dim) buffer, then SDPA with a
// mask. On the 2-core CI machine that was 4.6 ms a layer at batch 16 over up to
// 768 tokens (the gather writes and SDPA re-reads ~12 MB); reading each key and
// value once from the pool is the whole memory traffic this op needs.
//
// Work item: one (request, KV head), so the `group` query heads that share a KV
// head read each key and value row once. Scores are kept for the request's length
// (two passes: scores, then softmax-weighted values); accumulation is in float.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < dim; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t dim) {
#pragma omp simd
  for (int64_t i = 0; i < dim; ++i) y[i] += a * static_cast<float>(x[i]);
}

template <typename T>
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale, at::Tensor& out) {
  const int64_t bsz = q.size(0), n_heads = q.size(1), dim = q.size(2);
  const int64_t n_kv_heads = k_cache.size(1), v_dim = v_cache.size(2), n_slots = k_cache.size(0);
  const int64_t group = n_heads / n_kv_heads, width = kv_slots.size(1);
  const int64_t k_slot_stride = k_cache.stride(0), k_head_stride = k_cache.stride(1);
  const int64_t v_slot_stride = v_cache.stride(0), v_head_stride = v_cache.stride(1);
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int64_t* slots_ptr = kv_slots.data_ptr<int64_t>();
  const int64_t* lens_ptr = kv_lens.data_ptr<int64_t>();
  T* out_ptr = out.data_ptr<T>();
  const float scale_f = static_cast<float>(scale);

  at::parallel_for(0, bsz * n_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_rows(group * dim), scores, acc(group * v_dim), inv_sum(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t req = item / n_kv_heads, kv_head = item % n_kv_heads;
      const int64_t n = lens_ptr[req];
      const int64_t* slots = slots_ptr + req * width;
      for (int64_t r = 0; r < group; ++r) {
        const T* src = q_ptr + (req * n_heads + kv_head * group + r) * dim;
        for (int64_t i = 0; i < dim; ++i) q_rows[r * dim + i] = static_cast<float>(src[i]) * scale_f;
      }
      scores.resize(group * n);
      for (int64_t l = 0; l < n; ++l) {
        const int64_t slot = slots[l];
        TORCH_CHECK(slot >= 0 && slot < n_slots, "paged_decode_attention: slot ", slot, " of request ", req,
                    " is outside the pool of ", n_slots);
        const T* k_row = k_ptr + slot * k_slot_stride + kv_head * k_head_stride;
        for (int64_t r = 0; r < group; ++r) scores[r * n + l] = dot(q_rows.data() + r * dim, k_row, dim);
      }
      for (int64_t r = 0; r < group; ++r) {
        float* s = scores.data() + r * n;
        const float m = *std::max_element(s, s + n);
        float sum = 0.f;
        for (int64_t l = 0; l < n; ++l) {
          s[l] = std::exp(s[l] - m);
          sum += s[l];
        }
        inv_sum[r] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t l = 0; l < n; ++l) {
        const T* v_row = v_ptr + slots[l] * v_slot_stride + kv_head * v_head_stride;
        for (int64_t r = 0; r < group; ++r) axpy(scores[r * n + l], v_row, acc.data() + r * v_dim, v_dim);
      }
      for (int64_t r = 0; r < group; ++r) {
        T* dst = out_ptr + (req * n_heads + kv_head * group + r) * v_dim;
        for (int64_t i = 0; i < v_dim; ++i) dst[i] = static_cast<T>(acc[r * v_dim + i] * inv_sum[r]);
      }
    }
  });
}

// q: (bsz, n_heads, dim); k_cache: (n_slots, n_kv_heads, dim); v_cache: (n_slots, n_kv_heads, v_dim);
// kv_slots: (bsz, >= max len) int64, request i's keys at kv_slots[i, :kv_lens[i]]; kv_lens: (bsz,) int64, >= 1.
// Returns (bsz, n_heads, v_dim) in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& kv_slots, const at::Tensor& kv_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3,
              "paged_decode_attention: q, k_cache, v_cache must be 3-D");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "paged_decode_attention: q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1),
              "paged_decode_attention: k_cache and v_cache must have the same slots and heads");
  TORCH_CHECK(k_cache.size(2) == q.size(2), "paged_decode_attention: q and k_cache head dims differ");
  TORCH_CHECK(k_cache.stride(2) == 1 && v_cache.stride(2) == 1,
              "paged_decode_attention: the caches' last dimension must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "paged_decode_attention: query heads (", q.size(1),
              ") must be a multiple of KV heads (", k_cache.size(1), ")");
  TORCH_CHECK(kv_slots.dim() == 2 && kv_slots.size(0) == q.size(0) && kv_slots.scalar_type() == at::kLong,
              "paged_decode_attention: kv_slots must be (bsz, width) int64");
  TORCH_CHECK(kv_lens.dim() == 1 && kv_lens.size(0) == q.size(0) && kv_lens.scalar_type() == at::kLong,
              "paged_decode_attention: kv_lens must be (bsz,) int64");
  const at::Tensor q_c = q.contiguous(), slots_c = kv_slots.contiguous(), lens_c = kv_lens.contiguous();
  const int64_t* lens = lens_c.data_ptr<int64_t>();
  for (int64_t i = 0; i < q.size(0); ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= kv_slots.size(1), "paged_decode_attention: request ", i, " has ",
                lens[i], " keys; kv_slots holds 1 to ", kv_slots.size(1));
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), v_cache.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q_c, k_cache, v_cache, slots_c, lens_c, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(turbo_kernels, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_slots, Tensor kv_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(turbo_kernels, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
