/* The MLP's bias + GELU for training on the CPU (fp32): the forward writes GELU(x + b) and,
 * over its input, the GELU's derivative at x + b; the backward is then one product, fused
 * with the bias gradient's column sums.
 *
 * Why: torch runs the bias add inside the GEMM (a broadcast copy of the bias into the output
 * first), the GELU, then in the backward a GELU backward that evaluates erf and exp again and
 * a separate column sum for the bias; this file reads and writes each [tokens, 4h] tensor once
 * per pass and keeps no more than torch does (the derivative replaces the pre-activation that
 * torch's GELU backward keeps).
 *
 * erf form: Phi(v) = erfc(-v / sqrt 2) / 2 with erfc from Abramowitz & Stegun 7.1.26 (absolute
 * error <= 1.5e-7), whose exp(-z^2) is also the density's, so one exp gives both. tanh form:
 * GELU(v) = v sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3). Reciprocals by rcp14 and one
 * Newton step (relative error ~1e-8).
 */
#include <immintrin.h>
#include <stddef.h>

#include "vector.h"

enum { GELU_ERF = 1, GELU_TANH = 2 }; /* cpu_kernels.ACTIVATIONS */

static inline v16 vrcp(v16 a) {
  const v16 r = (v16)_mm512_rcp14_ps((__m512)a);
  return r * (2.0f - a * r);
}

static inline v16 vabs1(v16 x) { return (v16)((v16i)x & 0x7fffffff); }

static inline void gelu_erf(v16 v, v16 *y, v16 *d) {
  const v16 z = vabs1(v) * 0.70710678f;
  const v16 t = vrcp(1.0f + 0.3275911f * z);
  v16 poly = splat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const v16 e = vexp(-z * z); /* exp(-v^2 / 2) */
  const v16 half_erfc = 0.5f * poly * t * e;
  const v16 cdf = vselect(v >= splat(0.0f), 1.0f - half_erfc, half_erfc);
  *y = v * cdf;
  *d = cdf + v * e * 0.39894228f; /* Phi(v) + v phi(v) */
}

static inline void gelu_tanh(v16 v, v16 *y, v16 *d) {
  const v16 v2 = v * v;
  const v16 u = 0.7978845608f * v * (1.0f + 0.044715f * v2);
  /* sigmoid(2u) = (1 + tanh u) / 2; exp's argument kept under 80 so that 1 + exp stays
   * finite for the reciprocal's Newton step (s is then ~1e-35: GELU and its slope ~0) */
  const v16 m2u = -2.0f * u;
  const v16 e = vexp(vselect(m2u > splat(80.0f), splat(80.0f), m2u));
  const v16 s = vrcp(1.0f + e);
  *y = v * s;
  /* 1 - s = e s: no cancellation where s is near 1 */
  *d = s + v * s * (e * s) * (2.0f * 0.7978845608f) * (1.0f + 3.0f * 0.044715f * v2);
}

/* x [rows][n] (n a multiple of 16): y = GELU(x + bias), and x := GELU'(x + bias).
 * bias [n] or NULL. */
void bias_gelu_fwd(float *x, const float *bias, float *y, long rows, int n, int act,
                   int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (long r = 0; r < rows; r++) {
    float *xr = x + r * n, *yr = y + r * n;
    for (int c = 0; c < n; c += 16) {
      v16 v = *(const v16 *)(xr + c);
      if (bias)
        v += *(const v16 *)(bias + c);
      v16 out, grad;
      if (act == GELU_TANH)
        gelu_tanh(v, &out, &grad);
      else
        gelu_erf(v, &out, &grad);
      *(v16 *)(yr + c) = out;
      *(v16 *)(xr + c) = grad;
    }
  }
}

/* gx = gy * d ([rows][n], n a multiple of 16) and, unless NULL, dbias[c] = sum_r gx[r][c].
 * Rows go in fixed chunks of 64, each with its own column sums, which are then added in chunk
 * order: whatever the thread count, the same sums in the same order (the same bits on every
 * run), and each thread streams whole rows. Returns 0, or -1 when the chunks' sums could not
 * be allocated (nothing written then). */
int bias_gelu_bwd(const float *gy, const float *d, float *gx, float *dbias, long rows, int n,
                  int threads) {
  const long chunks = (rows + 63) / 64;
  float *part = NULL;
  if (dbias) {
    part = aligned_alloc(64, ((size_t)chunks * n * sizeof(float) + 63) / 64 * 64);
    if (!part)
      return -1;
  }
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (long ch = 0; ch < chunks; ch++) {
      float *sum = part ? part + (size_t)ch * n : NULL;
      for (long r = ch * 64; r < rows && r < ch * 64 + 64; r++) {
        const size_t at = (size_t)r * n;
        for (int c = 0; c < n; c += 16) {
          const v16 g = *(const v16 *)(gy + at + c) * *(const v16 *)(d + at + c);
          *(v16 *)(gx + at + c) = g;
          if (sum)
            *(v16 *)(sum + c) = r == ch * 64 ? g : *(v16 *)(sum + c) + g;
        }
      }
    }
    if (part) {
#pragma omp for schedule(static)
      for (int c = 0; c < n; c += 16) {
        v16 acc = {0};
        for (long ch = 0; ch < chunks; ch++)
          acc += *(const v16 *)(part + (size_t)ch * n + c);
        *(v16 *)(dbias + c) = acc;
      }
    }
  }
  free(part);
  return 0;
}
