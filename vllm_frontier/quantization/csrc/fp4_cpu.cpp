// W4A16 on CPU (AVX-512 + AVX512_BF16): y = x @ W^T with W in FP4 (NVFP4 / MXFP4), decoded inside the dot
// product, 32 values at a time, never written back to memory. Plain C ABI (loaded with ctypes), OpenMP over
// output rows (the OpenMP runtime is the one PyTorch already loaded: same soname libgomp.so.1).
//
// Weight layout ("chunk32", made at load by fp4_cpu.to_chunk32): per row, K/2 bytes; chunk c (values
// 32c .. 32c+31) is 16 bytes, byte j = code[32c + j] | code[32c + 16 + j] << 4. So one 16-byte load gives the
// 32 codes of a chunk in order after one mask and one shift, without the even/odd shuffle of the canonical
// two-per-byte layout. Block scales: uint8 [N, K/G], E4M3 bits (G = 16) or E8M0 codes (G = 32). Per-tensor
// scale g: float, applied to the row result.
//
// bf16 x: the 32 codes index a 32 x bf16 table (vpermw) holding the E2M1 values (exact in bf16), and
// vdpbf16ps multiplies them with 32 bf16 activations into 16 fp32 lanes (lanes 0..7 = values 0..15 = the first
// NVFP4 block, lanes 8..15 = the second), which one FMA scales by the block scales. Products and sums are fp32.
// fp32 x: the codes index a 16 x fp32 table (vpermps) and FMAs do the rest.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

float kE4M3[256];
float kE8M0[256];

struct Tables {
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
      float v;
      if (e == 15 && m == 7) v = NAN;
      else if (e == 0) v = ldexpf((float)m / 8.0f, -6);
      else v = ldexpf(1.0f + (float)m / 8.0f, e - 7);
      kE4M3[b] = s ? -v : v;
      kE8M0[b] = b == 255 ? NAN : ldexpf(1.0f, b - 127);
    }
  }
} kTables;

const uint16_t kLutBf16[32] = {
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
    0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
    0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
const float kLutF32[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline __m512 chunk_scales(const uint8_t* ws, int64_t c, int group, const float* tab) {
  if (group == 16) return _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(tab[ws[2 * c]]), _mm512_set1_ps(tab[ws[2 * c + 1]]));
  return _mm512_set1_ps(tab[ws[c]]);
}

inline __m512i decode_bf16(const uint8_t* p, __m512i lut) {
  __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p));
  __m256i lo = _mm256_and_si256(b, _mm256_set1_epi16(0x0F));
  __m256i hi = _mm256_srli_epi16(b, 4);
  return _mm512_permutexvar_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), lut);
}

// res[m] = sum_k x[m, k] * W[row, k] (block scales applied, global scale not), for MT rows of bf16 x.
template <int MT>
inline void dot_bf16(const uint16_t* x, int64_t ldx, const uint8_t* wp, const uint8_t* ws, int64_t K, int group,
                     const float* tab, float* res) {
  const __m512i lut = _mm512_loadu_si512(kLutBf16);
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const int64_t nc = K / 32;
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {  // two chunks per step: two independent FMA chains per row
    __m512i w0 = decode_bf16(wp + 16 * c, lut), w1 = decode_bf16(wp + 16 * c + 16, lut);
    __m512 s0 = chunk_scales(ws, c, group, tab), s1 = chunk_scales(ws, c + 1, group, tab);
    for (int m = 0; m < MT; ++m) {
      const uint16_t* xm = x + m * ldx + 32 * c;
      __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0, (__m512bh)_mm512_loadu_si512(xm));
      __m512 p1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w1, (__m512bh)_mm512_loadu_si512(xm + 32));
      acc0[m] = _mm512_fmadd_ps(p0, s0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(p1, s1, acc1[m]);
    }
  }
  for (; c < nc; ++c) {
    __m512i w0 = decode_bf16(wp + 16 * c, lut);
    __m512 s0 = chunk_scales(ws, c, group, tab);
    for (int m = 0; m < MT; ++m) {
      __m512 p0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w0,
                                   (__m512bh)_mm512_loadu_si512(x + m * ldx + 32 * c));
      acc0[m] = _mm512_fmadd_ps(p0, s0, acc0[m]);
    }
  }
  for (int m = 0; m < MT; ++m) res[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
}

template <int MT>
inline void dot_f32(const float* x, int64_t ldx, const uint8_t* wp, const uint8_t* ws, int64_t K, int group,
                    const float* tab, float* res) {
  const __m512 lut = _mm512_loadu_ps(kLutF32);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K / 32; ++c) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(wp + 16 * c)));
    __m512 wlo = _mm512_permutexvar_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)), lut);
    __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
    if (group == 16) {
      wlo = _mm512_mul_ps(wlo, _mm512_set1_ps(tab[ws[2 * c]]));
      whi = _mm512_mul_ps(whi, _mm512_set1_ps(tab[ws[2 * c + 1]]));
    } else {
      __m512 s = _mm512_set1_ps(tab[ws[c]]);
      wlo = _mm512_mul_ps(wlo, s);
      whi = _mm512_mul_ps(whi, s);
    }
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * ldx + 32 * c;
      acc[m] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(xm), acc[m]);
      acc[m] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(xm + 16), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) res[m] = _mm512_reduce_add_ps(acc[m]);
}

// All M rows of x against one weight row: res[m * res_stride].
template <typename XT>
inline void dot_rows(const XT* x, int64_t ldx, int64_t M, const uint8_t* wp, const uint8_t* ws, int64_t K, int group,
                     const float* tab, float* res, int64_t res_stride) {
  float r[4];
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {
    if constexpr (sizeof(XT) == 2) dot_bf16<4>(x + m * ldx, ldx, wp, ws, K, group, tab, r);
    else dot_f32<4>(x + m * ldx, ldx, wp, ws, K, group, tab, r);
    for (int i = 0; i < 4; ++i) res[(m + i) * res_stride] = r[i];
  }
  for (; m < M; ++m) {
    if constexpr (sizeof(XT) == 2) dot_bf16<1>(x + m * ldx, ldx, wp, ws, K, group, tab, r);
    else dot_f32<1>(x + m * ldx, ldx, wp, ws, K, group, tab, r);
    res[m * res_stride] = r[0];
  }
}

inline const float* scale_table(int group) { return group == 16 ? kE4M3 : kE8M0; }

template <typename XT>
inline float to_f32(XT v) {
  if constexpr (sizeof(XT) == 2) return bf16_to_f32(v);
  else return v;
}

template <typename XT>
inline XT from_f32(float v) {
  if constexpr (sizeof(XT) == 2) return f32_to_bf16(v);
  else return v;
}

template <typename XT>
void gemm(const XT* x, int64_t ldx, int64_t M, const uint8_t* wp, const uint8_t* ws, float g, int64_t N, int64_t K,
          int group, XT* out) {
  const float* tab = scale_table(group);
  const int64_t spr = K / group;
  // Each thread owns a contiguous range of output rows (its weight bytes are read once, sequentially).
#pragma omp parallel
  {
    std::vector<float> r(M);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      dot_rows<XT>(x, ldx, M, wp + n * (K / 2), ws + n * spr, K, group, tab, r.data(), 1);
      for (int64_t m = 0; m < M; ++m) out[m * N + n] = from_f32<XT>(r[m] * g);
    }
  }
}

inline float activation(float v, int act) {
  switch (act) {
    case 0: return v / (1.0f + expf(-v));                                                      // silu
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));                         // gelu
    default: return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));  // gelu_tanh
  }
}

// Routed experts, all in one call. ids: [T, k] local expert ids (-1: not on this rank). Per expert e with
// tokens t_1..t_c: a = act(x_t @ gate_e^T) * (x_t @ up_e^T) (rounded to x's dtype, as the unquantized path
// rounds its GEMM outputs), o = a @ down_e^T, out[t] += w * o (fp32 sum, rounded once at the end).
template <typename XT>
void moe(const XT* x, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k, const uint8_t* w13p, const uint8_t* w13s,
         const float* g13, const uint8_t* w2p, const uint8_t* w2s, const float* g2, const float* tw, const int32_t* ids,
         int group, int act, int weight_on_input, XT* out) {
  const float* tab = scale_table(group);
  // Assignments sorted by expert (counting sort): slot -> (token, weight).
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t i = 0; i < T * k; ++i)
    if (ids[i] >= 0 && ids[i] < E) count[ids[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  const int64_t S = count[E];
  std::vector<int64_t> fill(count.begin(), count.end() - 1), tok(S);
  std::vector<float> wt(S);
  for (int64_t i = 0; i < T * k; ++i) {
    int32_t e = ids[i];
    if (e < 0 || e >= E) continue;
    int64_t s = fill[e]++;
    tok[s] = i / k;
    wt[s] = tw[i];
  }
  std::vector<XT> xs(S * H), a(S * I);
  std::vector<float> o(S * H);
  for (int64_t s = 0; s < S; ++s) {
    const XT* src = x + tok[s] * H;
    if (weight_on_input)
      for (int64_t h = 0; h < H; ++h) xs[s * H + h] = from_f32<XT>(to_f32<XT>(src[h]) * wt[s]);
    else
      memcpy(&xs[s * H], src, H * sizeof(XT));
  }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);
  const int64_t RB = 16;  // rows of one work item
  const int64_t nb1 = (I + RB - 1) / RB, nb2 = (H + RB - 1) / RB;
  const int64_t A = (int64_t)active.size();
#pragma omp parallel
  {
    std::vector<float> rg(S), ru(S);
    // Phase 1: gate and up rows j of each active expert, activation fused (a row j needs gate j and up j only).
#pragma omp for schedule(static)
    for (int64_t it = 0; it < A * nb1; ++it) {
      const int64_t e = active[it / nb1], j0 = (it % nb1) * RB, j1 = j0 + RB < I ? j0 + RB : I;
      const int64_t s0 = count[e], c = count[e + 1] - s0;
      const uint8_t* pe = w13p + e * 2 * I * (H / 2);
      const uint8_t* se = w13s + e * 2 * I * (H / group);
      for (int64_t j = j0; j < j1; ++j) {
        dot_rows<XT>(&xs[s0 * H], H, c, pe + j * (H / 2), se + j * (H / group), H, group, tab, rg.data(), 1);
        dot_rows<XT>(&xs[s0 * H], H, c, pe + (I + j) * (H / 2), se + (I + j) * (H / group), H, group, tab, ru.data(), 1);
        for (int64_t m = 0; m < c; ++m) {
          float gv = to_f32<XT>(from_f32<XT>(rg[m] * g13[e])), uv = to_f32<XT>(from_f32<XT>(ru[m] * g13[e]));
          a[(s0 + m) * I + j] = from_f32<XT>(activation(gv, act) * uv);
        }
      }
    }
    // Phase 2: down rows.
#pragma omp for schedule(static)
    for (int64_t it = 0; it < A * nb2; ++it) {
      const int64_t e = active[it / nb2], n0 = (it % nb2) * RB, n1 = n0 + RB < H ? n0 + RB : H;
      const int64_t s0 = count[e], c = count[e + 1] - s0;
      const uint8_t* pe = w2p + e * H * (I / 2);
      const uint8_t* se = w2s + e * H * (I / group);
      for (int64_t n = n0; n < n1; ++n) {
        dot_rows<XT>(&a[s0 * I], I, c, pe + n * (I / 2), se + n * (I / group), I, group, tab, rg.data(), 1);
        for (int64_t m = 0; m < c; ++m) o[(s0 + m) * H + n] = to_f32<XT>(from_f32<XT>(rg[m] * g2[e]));
      }
    }
  }
  std::vector<float> acc(T * H, 0.0f);
  for (int64_t s = 0; s < S; ++s) {
    const float w = weight_on_input ? 1.0f : wt[s];
    float* dst = &acc[tok[s] * H];
    for (int64_t h = 0; h < H; ++h) dst[h] += w * o[s * H + h];
  }
  for (int64_t i = 0; i < T * H; ++i) out[i] = from_f32<XT>(acc[i]);
}

}  // namespace

extern "C" {

int fp4_cpu_abi_version() { return 1; }

// x [M, K] (row stride ldx), packed [N, K/2] chunk32, scales [N, K/G], out [M, N] contiguous. K % 32 == 0.
void fp4_gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint8_t* wp, const uint8_t* ws, float g, int64_t N,
                   int64_t K, int group, uint16_t* out) {
  gemm<uint16_t>(x, ldx, M, wp, ws, g, N, K, group, out);
}

void fp4_gemm_f32(const float* x, int64_t ldx, int64_t M, const uint8_t* wp, const uint8_t* ws, float g, int64_t N,
                  int64_t K, int group, float* out) {
  gemm<float>(x, ldx, M, wp, ws, g, N, K, group, out);
}

void fp4_moe_bf16(const uint16_t* x, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k, const uint8_t* w13p,
                  const uint8_t* w13s, const float* g13, const uint8_t* w2p, const uint8_t* w2s, const float* g2,
                  const float* tw, const int32_t* ids, int group, int act, int weight_on_input, uint16_t* out) {
  moe<uint16_t>(x, T, H, I, E, k, w13p, w13s, g13, w2p, w2s, g2, tw, ids, group, act, weight_on_input, out);
}

void fp4_moe_f32(const float* x, int64_t T, int64_t H, int64_t I, int64_t E, int64_t k, const uint8_t* w13p,
                 const uint8_t* w13s, const float* g13, const uint8_t* w2p, const uint8_t* w2s, const float* g2,
                 const float* tw, const int32_t* ids, int group, int act, int weight_on_input, float* out) {
  moe<float>(x, T, H, I, E, k, w13p, w13s, g13, w2p, w2s, g2, tw, ids, group, act, weight_on_input, out);
}

}  // extern "C"
