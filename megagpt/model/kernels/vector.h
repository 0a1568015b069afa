/* Vector helpers shared by megagpt's CPU kernels (cpu_decode.c, cpu_attention.c): 16-float
 * vectors through GCC's vector extensions (one AVX-512 register where -march=native gives
 * AVX-512; cpu_kernels.py only loads the library there), a lane select, exp and sums.
 *
 * exp: a degree-7 polynomial after reduction by ln 2 (~1 ulp), inputs clamped to
 * [-87.3, 88.7]. */
#ifndef MEGAGPT_VECTOR_H
#define MEGAGPT_VECTOR_H

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int v16i __attribute__((vector_size(64), aligned(4)));

static inline v16 splat(float f) { return (v16){0} + f; }

/* lanes of a where mask (a comparison's all-ones lanes), else of b (C has no vector ?:; not
 * "select", which <sys/select.h> declares) */
static inline v16 vselect(v16i mask, v16 a, v16 b) {
  return (v16)(((v16i)a & mask) | ((v16i)b & ~mask));
}

/* exp(x), x clamped to [-87.3, 88.7] (exp(-87.3) ~ 1e-38 stands in for smaller results) */
static inline v16 vexp(v16 x) {
  x = vselect(x < splat(-87.3f), splat(-87.3f), x);
  x = vselect(x > splat(88.7f), splat(88.7f), x);
  const v16 shifter = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v16 t = x * 1.44269504f + shifter;
  v16 n = t - shifter;
  v16i ni = (v16i)t - (v16i)shifter;
  v16 r = x - n * 0.693145752f - n * 1.42860677e-06f; /* ln 2 in two parts */
  v16 p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  v16i scale = (ni + 127) << 23;
  return p * (v16)scale;
}

static inline float hsum(v16 v) {
  float s = 0;
  for (int l = 0; l < 16; l++)
    s += v[l];
  return s;
}

static inline float hmax(v16 v) {
  float m = v[0];
  for (int l = 1; l < 16; l++)
    m = v[l] > m ? v[l] : m;
  return m;
}

#endif
