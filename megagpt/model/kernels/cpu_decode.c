/* The decoder's CPU kernels (fp32): a few-row linear with its bias, GELU or residual add
 * fused, and the attention of decode steps and speculative checks over the preallocated cache.
 *
 * 1. rowgemm: y[M, N] (=|+=) act(x[M, K] @ W[K, N] + bias).
 *
 * Why our own: a decode step multiplies a handful of rows by every weight of the model once,
 * so it should stream the weights at the memory's speed. The kernels torch offers for 4-64
 * rows (MKL through F.linear, oneDNN's packs, MKL's packed GEMM) streamed gpt3-base's 340 MB
 * at 12-19 GB/s on a 2-core Xeon whose memory reads 22-25 GB/s (BENCHMARKS-generate.md).
 *
 * Layout: the weight is packed once (python side, cpu_kernels.py) into column blocks of NB = 48,
 * [ceil(N/48)][K][48], zero-padded past N, so a block is one contiguous stream. Each thread
 * takes whole blocks; for a block it keeps the 48 columns of up to 8 rows in 24 vector
 * registers, reads each weight line once from memory and multiplies it by every row (rows
 * past 8 go in further passes over the block, then in cache). GCC's vector extensions make
 * 16-float vectors: one AVX-512 register (the library is only used where -march=native
 * gives AVX-512: rowgemm_vector_floats()).
 *
 * 2. attend: each fed token's keys and values into its slot of the cache, then its attention
 * over its row's slots up to its own position (scaled dot product, softmax in fp32), written
 * straight into the [tokens, heads * head_dim] layout the attention's output linear reads.
 * Fusing these saves what torch's path costs around them at a few rows: the K/V scatter, the
 * per-row mask, SDPA's setup per call, and the transposed copy of its output.
 *
 * The GELU and the softmax need exp: ours in vector.h (a degree-7 polynomial after reduction by
 * ln 2, ~1 ulp), vectorised like the rest; erf from the erfc approximation of Numerical
 * Recipes (fractional error < 1.2e-7).
 *
 * Threads: OpenMP, the same libgomp torch loads (one pool; the caller passes torch's thread
 * count). Built by cpu_kernels.py with the system C compiler, once per machine and source.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "vector.h"

enum { ACT_NONE = 0, ACT_GELU_ERF = 1, ACT_GELU_TANH = 2 };

static inline v16 vabs(v16 x) { return (v16)((v16i)x & 0x7fffffff); }

/* 0.5 x (1 + erf(x / sqrt 2)) through erfc(|x| / sqrt 2) (no cancellation for x < 0) */
static inline v16 vgelu_erf(v16 x) {
  v16 z = vabs(x) * 0.70710678f;
  v16 t = 1.0f / (1.0f + 0.5f * z);
  v16 poly = splat(0.17087277f);
  poly = poly * t - 0.82215223f;
  poly = poly * t + 1.48851587f;
  poly = poly * t - 1.13520398f;
  poly = poly * t + 0.27886807f;
  poly = poly * t - 0.18628806f;
  poly = poly * t + 0.09678418f;
  poly = poly * t + 0.37409196f;
  poly = poly * t + 1.00002368f;
  poly = poly * t - 1.26551223f;
  v16 erfc = t * vexp(poly - z * z);
  v16 one_plus_erf = vselect(x >= splat(0.0f), 2.0f - erfc, erfc);
  return 0.5f * x * one_plus_erf;
}

/* 0.5 x (1 + tanh y), y = sqrt(2 / pi) (x + 0.044715 x^3), as x / (1 + exp(-2y)): the same
 * value, without the cancellation of 1 + tanh y for y < 0 */
static inline v16 vgelu_tanh(v16 x) {
  v16 y = 0.7978845608f * (x + 0.044715f * x * x * x);
  return x / (1.0f + vexp(-2.0f * y));
}

static inline v16 activate(v16 x, int act) {
  return act == ACT_GELU_ERF ? vgelu_erf(x) : act == ACT_GELU_TANH ? vgelu_tanh(x) : x;
}

#define NB 48
#define PREFETCH_LINES 32 /* weight rows (of 192 bytes) ahead of the one being multiplied */

int rowgemm_vector_floats(void) {
#ifdef __AVX512F__
  return 16;
#else
  return 0;
#endif
}

int rowgemm_block(void) { return NB; }

/* MR rows (a compile-time constant) times one packed block: y[m, :ncols] (=|+=) acc + bias. */
#define TILE(MR)                                                                          \
  static void tile##MR(const float *x, size_t ldx, const float *w, int K, const float *b, \
                       float *y, size_t ldy, int ncols, int accumulate, int act) {        \
    v16 a[MR][3];                                                                         \
    for (int m = 0; m < MR; m++)                                                          \
      a[m][0] = a[m][1] = a[m][2] = (v16){0};                                             \
    for (int k = 0; k < K; k++) {                                                         \
      const float *wk = w + (size_t)k * NB;                                               \
      __builtin_prefetch(wk + PREFETCH_LINES * NB, 0, 3);                                 \
      __builtin_prefetch(wk + PREFETCH_LINES * NB + 32, 0, 3);                            \
      v16 w0 = *(const v16 *)wk, w1 = *(const v16 *)(wk + 16),                            \
          w2 = *(const v16 *)(wk + 32);                                                   \
      _Pragma("GCC unroll 8") for (int m = 0; m < MR; m++) {                              \
        float xs = x[(size_t)m * ldx + k];                                                \
        a[m][0] += xs * w0;                                                               \
        a[m][1] += xs * w1;                                                               \
        a[m][2] += xs * w2;                                                               \
      }                                                                                   \
    }                                                                                     \
    const v16 b0 = *(const v16 *)b, b1 = *(const v16 *)(b + 16),                         \
              b2 = *(const v16 *)(b + 32);                                                \
    for (int m = 0; m < MR; m++) {                                                        \
      v16 r[3] = {activate(a[m][0] + b0, act), activate(a[m][1] + b1, act),                \
                  activate(a[m][2] + b2, act)};                                           \
      float *ym = y + (size_t)m * ldy;                                                    \
      if (ncols == NB) {                                                                  \
        for (int j = 0; j < 3; j++) {                                                     \
          v16 *out = (v16 *)(ym + 16 * j);                                                \
          *out = accumulate ? *out + r[j] : r[j];                                         \
        }                                                                                 \
      } else {                                                                            \
        const float *rf = (const float *)r;                                               \
        for (int c = 0; c < ncols; c++)                                                   \
          ym[c] = accumulate ? ym[c] + rf[c] : rf[c];                                     \
      }                                                                                   \
    }                                                                                     \
  }

TILE(1)
TILE(2)
TILE(3)
TILE(4)
TILE(5)
TILE(6)
TILE(7)
TILE(8)

typedef void (*tile_fn)(const float *, size_t, const float *, int, const float *, float *,
                        size_t, int, int, int);
static const tile_fn TILES[9] = {0, tile1, tile2, tile3, tile4, tile5, tile6, tile7, tile8};

/* x [M, K] rows ldx apart; wp the packed weight; bias [N] or NULL; y [M, N] rows ldy apart.
 * accumulate: y += x @ W + bias (a residual add), else y = act(x @ W + bias). */
void rowgemm(const float *x, long ldx, const float *wp, const float *bias, float *y, long ldy,
             int M, int N, int K, int accumulate, int act, int threads) {
  const int nblocks = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int nb = 0; nb < nblocks; nb++) {
    const int ncols = N - nb * NB < NB ? N - nb * NB : NB;
    float b[NB] __attribute__((aligned(64)));
    memset(b, 0, sizeof b);
    if (bias)
      memcpy(b, bias + (size_t)nb * NB, (size_t)ncols * sizeof(float));
    const float *w = wp + (size_t)nb * K * NB;
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int mr = M - m0 < 8 ? M - m0 : 8;
      TILES[mr](x + (size_t)m0 * ldx, (size_t)ldx, w, K, b, y + (size_t)m0 * ldy + nb * NB,
                (size_t)ldy, ncols, accumulate, act);
    }
  }
}

/* The activation alone over n floats (tests compare it with torch's). */
void activation(const float *x, float *y, long n, int act) {
  long i = 0;
  for (; i + 16 <= n; i += 16)
    *(v16 *)(y + i) = activate(*(const v16 *)(x + i), act);
  if (i < n) {
    float in[16] = {0}, out[16] __attribute__((aligned(64)));
    memcpy(in, x + i, (size_t)(n - i) * sizeof(float));
    *(v16 *)out = activate(*(const v16 *)in, act);
    memcpy(y + i, out, (size_t)(n - i) * sizeof(float));
  }
}

/* qkv [T, nh * 3 * hd], rows ldq apart, T = b * s tokens (row r's at r * s .. r * s + s - 1),
 * each head's q | k | v of hd floats; pos [T]: each token's cache slot (< L); keys, values
 * [b, nh, L, hd]; ctx [T, nh * hd] (out). hd a multiple of 16, at most 256.
 * Returns -1, or the first token whose slot lies outside 0 .. L-1 (then nothing is written). */
int attend(const float *qkv, long ldq, const int64_t *pos, float *keys, float *values,
           float *ctx, int b, int s, int nh, int hd, int L, int threads) {
  const int T = b * s, nv = hd / 16;
  for (int t = 0; t < T; t++)
    if (pos[t] < 0 || pos[t] >= L)
      return t;
  const float scale = 1.0f / __builtin_sqrtf((float)hd);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for collapse(2) schedule(static)
    for (int t = 0; t < T; t++)
      for (int h = 0; h < nh; h++) {
        const float *src = qkv + (size_t)t * ldq + (size_t)h * 3 * hd;
        size_t slot = (((size_t)(t / s) * nh + h) * L + (size_t)pos[t]) * hd;
        memcpy(keys + slot, src + hd, (size_t)hd * sizeof(float));
        memcpy(values + slot, src + 2 * hd, (size_t)hd * sizeof(float));
      }
    /* the implicit barrier: every fed token's keys are in before any token reads them */
    float *score = __builtin_alloca((size_t)L * sizeof(float));
#pragma omp for collapse(2) schedule(static)
    for (int r = 0; r < b; r++)
      for (int h = 0; h < nh; h++) {
        const float *K = keys + ((size_t)r * nh + h) * L * hd;
        const float *V = values + ((size_t)r * nh + h) * L * hd;
        for (int i = 0; i < s; i++) {
          const int t = r * s + i;
          const int n = (int)pos[t] + 1; /* slots 0 .. pos[t] */
          const float *q = qkv + (size_t)t * ldq + (size_t)h * 3 * hd;
          v16 qv[16];
          for (int j = 0; j < nv; j++)
            qv[j] = *(const v16 *)(q + 16 * j) * scale;
          float top = -__builtin_inff();
          for (int k = 0; k < n; k++) {
            const float *kk = K + (size_t)k * hd;
            v16 acc = qv[0] * *(const v16 *)kk;
            for (int j = 1; j < nv; j++)
              acc += qv[j] * *(const v16 *)(kk + 16 * j);
            score[k] = hsum(acc);
            top = score[k] > top ? score[k] : top;
          }
          int k = 0;
          v16 tot = {0};
          for (; k + 16 <= n; k += 16) {
            v16 e = vexp(*(v16 *)(score + k) - top);
            *(v16 *)(score + k) = e;
            tot += e;
          }
          float total = hsum(tot);
          if (k < n) {
            float tail[16] __attribute__((aligned(64)));
            for (int l = 0; l < 16; l++)
              tail[l] = k + l < n ? score[k + l] - top : -100.0f;
            v16 e = vexp(*(v16 *)tail);
            for (int l = 0; k + l < n; l++) {
              score[k + l] = e[l];
              total += e[l];
            }
          }
          v16 out[16];
          for (int j = 0; j < nv; j++)
            out[j] = (v16){0};
          for (int k2 = 0; k2 < n; k2++) {
            const float *vv = V + (size_t)k2 * hd;
            const float p = score[k2];
            for (int j = 0; j < nv; j++)
              out[j] += p * *(const v16 *)(vv + 16 * j);
          }
          float *o = ctx + (size_t)t * nh * hd + (size_t)h * hd;
          const float inv = 1.0f / total;
          for (int j = 0; j < nv; j++)
            *(v16 *)(o + 16 * j) = out[j] * inv;
        }
      }
  }
  return -1;
}
