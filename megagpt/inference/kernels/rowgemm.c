/* Few-row fp32 linear for decoding on CPU: y[M, N] (=|+=) x[M, K] @ W[K, N] + bias.
 *
 * Why our own: a decode step multiplies a handful of rows by every weight of the model once,
 * so it should stream the weights at the memory's speed. The kernels torch offers for 4-64
 * rows (MKL through F.linear, oneDNN's packs, MKL's packed GEMM) streamed gpt3-base's 340 MB
 * at 12-19 GB/s on a 2-core Xeon whose memory reads 22-25 GB/s (BENCHMARKS-generate.md).
 *
 * Layout: the weight is packed once (python side, rowgemm.py) into column blocks of NB = 48,
 * [ceil(N/48)][K][48], zero-padded past N, so a block is one contiguous stream. Each thread
 * takes whole blocks; for a block it keeps the 48 columns of up to 8 rows in 24 vector
 * registers, reads each weight line once from memory and multiplies it by every row (rows
 * past 8 go in further passes over the block, then in cache). GCC's vector extensions make
 * 16-float vectors: one AVX-512 register (the library is only used where -march=native
 * gives AVX-512: rowgemm_vector_floats()).
 *
 * Threads: OpenMP, the same libgomp torch loads (one pool; the caller passes torch's thread
 * count). Built by rowgemm.py with the system C compiler, once per machine and source.
 */
#include <stddef.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));

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
                       float *y, size_t ldy, int ncols, int accumulate) {                 \
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
      v16 r[3] = {a[m][0] + b0, a[m][1] + b1, a[m][2] + b2};                              \
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
                        size_t, int, int);
static const tile_fn TILES[9] = {0, tile1, tile2, tile3, tile4, tile5, tile6, tile7, tile8};

/* x [M, K] rows ldx apart; wp the packed weight; bias [N] or NULL; y [M, N] rows ldy apart.
 * accumulate: y += x @ W + bias (a residual add), else y = x @ W + bias. */
void rowgemm(const float *x, long ldx, const float *wp, const float *bias, float *y, long ldy,
             int M, int N, int K, int accumulate, int threads) {
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
                (size_t)ldy, ncols, accumulate);
    }
  }
}
