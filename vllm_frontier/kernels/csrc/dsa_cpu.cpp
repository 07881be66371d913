// DeepSeek Sparse Attention on CPU for decode-sized steps: the indexer's K-cache write, its scores and top-k,
// the latent-cache write, and the sparse MLA attention over the selected latent rows, each one call per layer
// instead of tens of
// small torch ops (on a small model the op count, not the arithmetic, is what a decode step costs).
// Plain C ABI (loaded with ctypes by kernels/dsa_cpu.py), OpenMP when a call has enough work (the runtime is
// the one PyTorch already loaded: same soname libgomp.so.1). Math as the torch references in kernels/ref.py:
//
//   write:   scale = max(amax|k|, 1e-4) / 448 (ue8m0: rounded up to a power of two), code = e4m3(k / scale)
//            (saturating, round to nearest even); per block: block_size x D codes, then block_size fp32 scales.
//   scores:  logit[t, s] = sum_h w[t, h] * relu(q[t, h] . (code[s] * scale[s]))   for s < visible[t];
//            NaN counts as -inf.
//   top-k:   the k highest logits, equal logits -> the lower position; positions ascending, -1 when fewer
//            than k keys are visible.
//   sparse:  p = softmax(scale * q . row) over the selected rows (fp32), out = sum p * row[:dv],
//            lse = log-sum-exp (-inf and out = 0 when no row is selected).
//
// Element types (`dtype` arguments): 0 float32, 1 bfloat16, 2 float16, 3 float8_e4m3fn.
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define DSA_AVX2 1
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

float kE4M3[256];

struct Tables {
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
      float v;
      if (e == 15 && m == 7) v = NAN;
      else if (e == 0) v = ldexpf((float)m / 8.0f, -6);
      else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
      kE4M3[b] = s ? -v : v;
    }
  }
} kTables;

inline float bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float f16_to_f32(uint16_t h) {
  uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3FF;
  if (e == 31) return bits_f32(s | 0x7F800000 | (m << 13));
  if (e == 0) {
    float v = ldexpf((float)m, -24);
    return s ? -v : v;
  }
  return bits_f32(s | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even (values in range; used for outputs)
  uint32_t u = f32_bits(f), s = (u >> 16) & 0x8000;
  float a = fabsf(f);
  if (a != a) return (uint16_t)(s | 0x7E00);
  if (a >= 65520.0f) return (uint16_t)(s | 0x7C00);
  if (a < 6.103515625e-05f) return (uint16_t)(s | (uint32_t)lrintf(a * 16777216.0f));  // subnormal: k * 2^-24
  uint32_t au = f32_bits(a);
  au += 0xFFF + ((au >> 13) & 1);
  return (uint16_t)(s | (((au >> 23) - 112) << 10) | ((au >> 13) & 0x3FF));
}

inline float load(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case 0: return ((const float*)p)[i];
    case 1: return bits_f32((uint32_t)((const uint16_t*)p)[i] << 16);
    case 2: return f16_to_f32(((const uint16_t*)p)[i]);
    default: return kE4M3[((const uint8_t*)p)[i]];
  }
}

inline void store(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case 0: ((float*)p)[i] = v; break;
    case 1: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
    default: ((uint16_t*)p)[i] = f32_to_f16(v); break;
  }
}

// fp32 -> e4m3fn code, saturating to +-448, round to nearest even (kernels/fp8.py f32_to_e4m3_bits).
inline uint8_t f32_to_e4m3(float x) {
  x = fminf(fmaxf(x, -448.0f), 448.0f);
  uint32_t sign = (f32_bits(x) >> 24) & 0x80;
  float a = fabsf(x);
  uint32_t au = f32_bits(a);
  int32_t code;
  if (a < 0.015625f) {
    volatile float t = a * 512.0f + 8388608.0f;  // volatile: keep the rounding add / subtract pair
    code = (int32_t)(t - 8388608.0f);
  } else {
    code = (int32_t)((au + 0x7FFFF + ((au >> 20) & 1)) >> 20) - 960;
  }
  return (uint8_t)(code | sign);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One indexer key of D fp8 codes (a multiple of 8 with AVX2) -> fp32 values * scale.
// AVX2 + F16C: an e4m3 code's 7 magnitude bits placed under fp16's sign give an fp16 equal to the e4m3 value
// times 2^-8, subnormals included (fp16 has the wider exponent); 2^8 is folded into the scale. (The e4m3 NaN
// code would read as 480: our writer never produces it, it saturates.)
inline void decode_key(const uint8_t* codes, float scale, float* out, int64_t D) {
#ifdef DSA_AVX2
  if (D % 8 == 0) {
    const __m256 s = _mm256_set1_ps(scale * 256.0f);
    for (int64_t d = 0; d < D; d += 8) {
      __m128i c = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(codes + d)));
      __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x7F)), 7),
                               _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x80)), 8));
      _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_cvtph_ps(h), s));
    }
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) out[d] = kE4M3[codes[d]] * scale;
}

// Work (multiply-adds) below which a call stays on the calling thread (8M: a batch-4 decode step at 4k context):
// a decode step's share is a fraction of a millisecond on one core, and a parallel region's barrier waits for
// a thread that, in vLLM's engine process on a small machine, shares its core with the API process.
const int64_t kParallelWork = 1 << 23;

}  // namespace

extern "C" {

int dsa_cpu_abi_version() { return 2; }

// Indexer keys -> FP8 codes + one fp32 scale per token, written by slot (slot < 0: skipped).
void dsa_write_k(const void* k, int k_dtype, int64_t T, int64_t D, int64_t k_stride, const int64_t* slots,
                 uint8_t* cache, int64_t blk_stride, int64_t bs, int ue8m0) {
  std::vector<float> v(D);
  for (int64_t t = 0; t < T; ++t) {
    int64_t slot = slots[t];
    if (slot < 0) continue;
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      v[d] = load(k, k_dtype, t * k_stride + d);
      amax = fmaxf(amax, fabsf(v[d]));
    }
    float scale = fmaxf(amax, 1e-4f) / 448.0f;
    if (ue8m0) scale = exp2f(ceilf(log2f(scale)));
    uint8_t* blk = cache + (slot / bs) * blk_stride;
    int64_t off = slot % bs;
    for (int64_t d = 0; d < D; ++d) blk[off * D + d] = f32_to_e4m3(v[d] / scale);
    memcpy(blk + bs * D + off * 4, &scale, 4);
  }
}

// Latent rows [kv_c (dc values) | k_pe (dr values)] written by slot into a float paged cache (slot < 0: skipped).
void dsa_write_latent(const void* kv_c, int c_dtype, int64_t c_stride, const void* k_pe, int r_dtype,
                      int64_t r_stride, int64_t T, int64_t dc, int64_t dr, const int64_t* slots, void* cache,
                      int cache_dtype, int64_t blk_stride, int64_t row_stride, int64_t bs) {
  for (int64_t t = 0; t < T; ++t) {
    int64_t slot = slots[t];
    if (slot < 0) continue;
    int64_t base = (slot / bs) * blk_stride + (slot % bs) * row_stride;
    for (int64_t d = 0; d < dc; ++d) store(cache, cache_dtype, base + d, load(kv_c, c_dtype, t * c_stride + d));
    for (int64_t d = 0; d < dr; ++d) store(cache, cache_dtype, base + dc + d, load(k_pe, r_dtype, t * r_stride + d));
  }
}

// Indexer scores of T query tokens over the paged FP8 K cache, and each token's top-k positions.
// q [T, H, D] (strides q_st, q_sh), w [T, H] fp32 (strides w_st, w_sh), block_table rows by token_req[t],
// visible[t] keys per token; out [T, k] int32 (row stride out_st).
void dsa_indexer_topk(const void* q, int q_dtype, int64_t T, int64_t H, int64_t D, int64_t q_st, int64_t q_sh,
                      const float* w, int64_t w_st, int64_t w_sh, const uint8_t* cache, int64_t blk_stride,
                      int64_t bs, const int32_t* block_table, int64_t bt_stride, const int64_t* token_req,
                      const int32_t* visible, int64_t k, int32_t* out, int64_t out_st) {
  int64_t max_vis = 0, work = 0;
  for (int64_t t = 0; t < T; ++t) {
    max_vis = std::max<int64_t>(max_vis, visible[t]);
    work += (int64_t)visible[t] * H * D;
  }
  std::vector<float> qf(T * H * D), logits(T * std::max<int64_t>(max_vis, 1));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) qf[(t * H + h) * D + d] = load(q, q_dtype, t * q_st + h * q_sh + d);
  // scores: chunks of keys across threads
  const int64_t chunk = 64;
  const int64_t chunks_per_row = (max_vis + chunk - 1) / chunk;
#pragma omp parallel if (work >= kParallelWork)
  {
    std::vector<float> kf(D);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < T * chunks_per_row; ++job) {
      int64_t t = job / chunks_per_row, s0 = (job % chunks_per_row) * chunk;
      int64_t s1 = std::min<int64_t>(s0 + chunk, visible[t]);
      const int32_t* row = block_table + token_req[t] * bt_stride;
      const float* qt = &qf[t * H * D];
      for (int64_t s = s0; s < s1; ++s) {
        const uint8_t* blk = cache + (int64_t)row[s / bs] * blk_stride;
        int64_t off = s % bs;
        float scale;
        memcpy(&scale, blk + bs * D + off * 4, 4);
        decode_key(blk + off * D, scale, kf.data(), D);
        float logit = 0.0f;
        for (int64_t h = 0; h < H; ++h) {
          float sc = dot(qt + h * D, kf.data(), D);
          logit += w[t * w_st + h * w_sh] * (sc > 0.0f ? sc : 0.0f);
        }
        logits[t * max_vis + s] = logit != logit ? -INFINITY : logit;
      }
    }
  }
  // top-k per token: (logit desc, position asc), then positions ascending
#pragma omp parallel if (work >= kParallelWork && T > 1)
  {
    std::vector<int32_t> idx;
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < T; ++t) {
      int32_t* o = out + t * out_st;
      int64_t vis = visible[t];
      if (vis <= k) {
        for (int64_t j = 0; j < k; ++j) o[j] = j < vis ? (int32_t)j : -1;
        continue;
      }
      const float* lg = &logits[t * max_vis];
      idx.resize(vis);
      for (int64_t s = 0; s < vis; ++s) idx[s] = (int32_t)s;
      auto better = [lg](int32_t a, int32_t b) { return lg[a] > lg[b] || (lg[a] == lg[b] && a < b); };
      std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), better);
      std::sort(idx.begin(), idx.begin() + k);
      for (int64_t j = 0; j < k; ++j) o[j] = idx[j];
    }
  }
}

// Sparse MLA (absorbed form) of T query tokens over the paged latent cache (float rows).
// q [T, H, D] (strides q_st, q_sh); cache rows: block b, offset o at b * blk_stride + o * row_stride elements;
// indices [T, K] request-local positions (-1 unused; row stride idx_st), mapped through the block table row
// of token_req[t]; out [T, H, dv] (strides o_st, o_sh, dtype out_dtype), lse [T, H] fp32.
void dsa_sparse_mla(const void* q, int q_dtype, int64_t T, int64_t H, int64_t D, int64_t dv, int64_t q_st,
                    int64_t q_sh, const void* cache, int c_dtype, int64_t blk_stride, int64_t row_stride, int64_t bs,
                    const int32_t* block_table, int64_t bt_stride, const int64_t* token_req, const int32_t* indices,
                    int64_t idx_st, int64_t K, float softmax_scale, void* out, int out_dtype, int64_t o_st,
                    int64_t o_sh, float* lse) {
  int64_t work = T * H * K * (D + dv);
#pragma omp parallel if (work >= kParallelWork && T > 1)
  {
    std::vector<float> rows(K * D), qh(D), p(K), acc(dv);
#pragma omp for schedule(dynamic)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* bt = block_table + token_req[t] * bt_stride;
      int64_t n = 0;
      for (int64_t j = 0; j < K; ++j) {  // gather the selected rows once, as fp32
        int32_t pos = indices[t * idx_st + j];
        if (pos < 0) continue;
        int64_t base = (int64_t)bt[pos / bs] * blk_stride + (int64_t)(pos % bs) * row_stride;
        float* r = &rows[n * D];
        for (int64_t d = 0; d < D; ++d) r[d] = load(cache, c_dtype, base + d);
        ++n;
      }
      for (int64_t h = 0; h < H; ++h) {
        int64_t ob = t * o_st + h * o_sh;
        if (n == 0) {
          for (int64_t v = 0; v < dv; ++v) store(out, out_dtype, ob + v, 0.0f);
          lse[t * H + h] = -INFINITY;
          continue;
        }
        for (int64_t d = 0; d < D; ++d) qh[d] = load(q, q_dtype, t * q_st + h * q_sh + d);
        float m = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = dot(qh.data(), &rows[j * D], D) * softmax_scale;
          m = fmaxf(m, p[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = expf(p[j] - m);
          sum += p[j];
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float* r = &rows[j * D];
          const float pj = p[j] / sum;
#pragma omp simd
          for (int64_t v = 0; v < dv; ++v) acc[v] += pj * r[v];
        }
        for (int64_t v = 0; v < dv; ++v) store(out, out_dtype, ob + v, acc[v]);
        lse[t * H + h] = m + logf(sum);
      }
    }
  }
}

}  // extern "C"
