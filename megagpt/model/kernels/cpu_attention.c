/* Causal self-attention for training on the CPU (fp32): the forward and the backward of
 * softmax(Q K^T / sqrt(hd)) V over each (batch row, head), read from and written to the layouts
 * of the decoder layer, so no split, permute, concatenation or zero fill surrounds them.
 *
 * Why our own: at the sequence lengths of CPU training (up to a few hundred tokens) torch's
 * CPU flash attention spends more on its blocking, masks and the glue around it (the QKV
 * split's concatenation in the backward, zero-filled gradients, contiguous copies) than on the
 * arithmetic; this file took half its time for a gpt3-base layer at 128-512 tokens on a
 * 2-core Xeon (docs/training-speed.md). Past ~1,000 tokens the s x s tiles leave the cache
 * and flash attention is faster: cpu_kernels.py routes those to torch.
 *
 * One task per (batch row, head), OpenMP threads over tasks (static schedule: the same sums in
 * the same order every run, so a resumed run is bit-identical). A task copies its q, k, v
 * (and, backward, the output gradient) into per-thread scratch, transposes k (and v) in
 * 16 x 16 register blocks, and computes:
 *   forward:  S = Q K^T / sqrt(hd) for j <= i; P = exp(S - max) row by row; O = (P M V) / sum;
 *             lse = max + log(sum) kept for the backward.
 *   backward: P = exp(S - lse) recomputed; dP = M (dO V^T); D_i = dO_i . O_i;
 *             dS = P (dP - D) / sqrt(hd); dV = (P M)^T dO; dK = dS^T Q; dQ = dS K.
 * M is attention dropout's keep mask times 1 / (1 - p) (1 without dropout), a hash of the
 * call's seed and (row, head, i, j), recomputed in the backward (keep_factor).
 * Products run on 8 x 32 (scores) and 4 x 64 (the others) register tiles over the causal
 * triangle only. Entries past the diagonal that a tile reads are zero.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vector.h"

static const v16i LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* ---- the products, on [rows][cols] tiles in per-thread scratch ---- */

/* S[i][j] = alpha sum_d A[i][d] BT[d][j]: rows i < s8 (A [s8][hd]), columns of each 32-wide
 * block up to the one holding the 8-row tile's last row (the causal triangle and its edge). */
static void scores(const float *A, const float *BT, int sp, int s8, int hd, float alpha,
                   float *S) {
  for (int i0 = 0; i0 < s8; i0 += 8)
    for (int j0 = 0; j0 < i0 + 8 && j0 < sp; j0 += 32) {
      v16 acc[8][2];
      for (int r = 0; r < 8; r++)
        acc[r][0] = acc[r][1] = (v16){0};
      const float *a = A + (size_t)i0 * hd;
      for (int d = 0; d < hd; d++) {
        const v16 b0 = *(const v16 *)(BT + (size_t)d * sp + j0);
        const v16 b1 = *(const v16 *)(BT + (size_t)d * sp + j0 + 16);
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
          const float x = a[(size_t)r * hd + d];
          acc[r][0] += x * b0;
          acc[r][1] += x * b1;
        }
      }
      for (int r = 0; r < 8; r++) {
        *(v16 *)(S + (size_t)(i0 + r) * sp + j0) = acc[r][0] * alpha;
        *(v16 *)(S + (size_t)(i0 + r) * sp + j0 + 16) = acc[r][1] * alpha;
      }
    }
}

/* O[i][:] = rs[i] sum_{j <= i} P[i][j] X[j][:] (P zero past the diagonal), rows i < s */
#define PV(NV)                                                                               \
  static void pv##NV(const float *P, int sp, int s, const float *X, int ldx, float *O,      \
                     long ldo, const float *rs) {                                           \
    for (int i0 = 0; i0 < s; i0 += 4) {                                                      \
      const int jend = i0 + 4 < s ? i0 + 4 : s;                                              \
      v16 acc[4][NV];                                                                        \
      for (int r = 0; r < 4; r++)                                                            \
        for (int v = 0; v < NV; v++)                                                         \
          acc[r][v] = (v16){0};                                                              \
      for (int j = 0; j < jend; j++) {                                                       \
        v16 xv[NV];                                                                          \
        for (int v = 0; v < NV; v++)                                                         \
          xv[v] = *(const v16 *)(X + (size_t)j * ldx + 16 * v);                              \
        for (int r = 0; r < 4; r++) {                                                        \
          const float p = P[(size_t)(i0 + r) * sp + j];                                      \
          for (int v = 0; v < NV; v++)                                                       \
            acc[r][v] += p * xv[v];                                                          \
        }                                                                                    \
      }                                                                                      \
      for (int r = 0; r < 4 && i0 + r < s; r++)                                              \
        for (int v = 0; v < NV; v++)                                                         \
          *(v16 *)(O + (size_t)(i0 + r) * ldo + 16 * v) = acc[r][v] * (rs ? rs[i0 + r] : 1); \
    }                                                                                        \
  }

/* O[j][:] = sum_{i >= j} P[i][j] X[i][:], rows j < s */
#define PTX(NV)                                                                              \
  static void ptx##NV(const float *P, int sp, int s, const float *X, int ldx, float *O,     \
                      long ldo, const float *rs) {                                          \
    (void)rs;                                                                                \
    for (int j0 = 0; j0 < s; j0 += 4) {                                                      \
      v16 acc[4][NV];                                                                        \
      for (int r = 0; r < 4; r++)                                                            \
        for (int v = 0; v < NV; v++)                                                         \
          acc[r][v] = (v16){0};                                                              \
      for (int i = j0; i < s; i++) {                                                         \
        const float *p = P + (size_t)i * sp + j0;                                            \
        v16 xv[NV];                                                                          \
        for (int v = 0; v < NV; v++)                                                         \
          xv[v] = *(const v16 *)(X + (size_t)i * ldx + 16 * v);                              \
        for (int r = 0; r < 4; r++)                                                          \
          for (int v = 0; v < NV; v++)                                                       \
            acc[r][v] += p[r] * xv[v];                                                       \
      }                                                                                      \
      for (int r = 0; r < 4 && j0 + r < s; r++)                                              \
        for (int v = 0; v < NV; v++)                                                         \
          *(v16 *)(O + (size_t)(j0 + r) * ldo + 16 * v) = acc[r][v];                         \
    }                                                                                        \
  }
PV(1) PV(2) PV(3) PV(4) PTX(1) PTX(2) PTX(3) PTX(4)
typedef void (*prod_fn)(const float *, int, int, const float *, int, float *, long,
                        const float *);
static const prod_fn PVS[5] = {0, pv1, pv2, pv3, pv4}, PTXS[5] = {0, ptx1, ptx2, ptx3, ptx4};
/* X [s][hd] contiguous; O rows ldo apart; hd in column chunks of up to 64 */
static void product(const prod_fn *fns, const float *P, int sp, int s, const float *X, int hd,
                    float *O, long ldo, const float *rs) {
  for (int c = 0; c < hd; c += 64) {
    const int nv = hd - c >= 64 ? 4 : (hd - c) / 16;
    fns[nv](P, sp, s, X + c, hd, O + c, ldo, rs);
  }
}

static inline void tr16(__m512 *r) {
  __m512 t[16];
  for (int l = 0; l < 16; l += 2) {
    t[l] = _mm512_unpacklo_ps(r[l], r[l + 1]);
    t[l + 1] = _mm512_unpackhi_ps(r[l], r[l + 1]);
  }
  for (int l = 0; l < 16; l += 4) {
    r[l] = _mm512_shuffle_ps(t[l], t[l + 2], 0x44);
    r[l + 1] = _mm512_shuffle_ps(t[l], t[l + 2], 0xEE);
    r[l + 2] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0x44);
    r[l + 3] = _mm512_shuffle_ps(t[l + 1], t[l + 3], 0xEE);
  }
  for (int g = 0; g < 16; g += 8)
    for (int l = 0; l < 4; l++) {
      t[g + l] = _mm512_shuffle_f32x4(r[g + l], r[g + l + 4], 0x88);
      t[g + l + 4] = _mm512_shuffle_f32x4(r[g + l], r[g + l + 4], 0xdd);
    }
  for (int l = 0; l < 8; l++) {
    r[l] = _mm512_shuffle_f32x4(t[l], t[l + 8], 0x88);
    r[l + 8] = _mm512_shuffle_f32x4(t[l], t[l + 8], 0xdd);
  }
}
/* A [s16][hd] -> T [hd][sp] */
static void transpose(const float *A, int s16, int hd, int sp, float *T) {
  for (int r0 = 0; r0 < s16; r0 += 16)
    for (int c0 = 0; c0 < hd; c0 += 16) {
      __m512 r[16];
      for (int l = 0; l < 16; l++)
        r[l] = _mm512_loadu_ps(A + (size_t)(r0 + l) * hd + c0);
      tr16(r);
      for (int l = 0; l < 16; l++)
        _mm512_storeu_ps(T + (size_t)(c0 + l) * sp + r0, r[l]);
    }
}
static void copy_rows(const float *X, long ld, int s, int hd, float *A) {
  for (int i = 0; i < s; i++)
    for (int c = 0; c < hd; c += 16)
      *(v16 *)(A + (size_t)i * hd + c) = *(const v16 *)(X + (size_t)i * ld + c);
}

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

typedef struct { float *Q, *K, *V, *G, *KT, *VT, *P, *D, *row; } scratch;
static scratch scratch_new(int s, int hd) {
  const int s16 = round_up(s, 16), sp = round_up(s, 32), s8 = round_up(s, 8);
  const size_t mat = (size_t)s16 * hd, tr = (size_t)hd * sp, sq = (size_t)(s8 > s16 ? s8 : s16) * sp;
  const size_t total = 4 * mat + 2 * tr + 2 * sq + s16;
  float *base = aligned_alloc(64, (total * sizeof(float) + 63) / 64 * 64);
  scratch w = {0};
  if (!base) return w;
  memset(base, 0, total * sizeof(float));
  w.Q = base; w.K = w.Q + mat; w.V = w.K + mat; w.G = w.V + mat;
  w.KT = w.G + mat; w.VT = w.KT + tr; w.P = w.VT + tr; w.D = w.P + sq; w.row = w.D + sq;
  return w;
}

/* Attention dropout: the keep factor of (task key, i, j), 1 / (1 - p) or 0, for the 16
 * columns from j. The mask is a hash of the call's seed, the batch row, the head and the
 * position pair (two rounds of murmur3's 32-bit finaliser), so the backward recomputes it and
 * it does not depend on the thread count or on which task ran first. */
typedef struct { uint32_t k0, k1; float p, keep; } dropout;
static inline v16i fmix(v16i v) {
  v16i x = v;
  x ^= (v16i)((__v16su)x >> 16);
  x *= (int)0x85ebca6b;
  x ^= (v16i)((__v16su)x >> 13);
  x *= (int)0xc2b2ae35;
  x ^= (v16i)((__v16su)x >> 16);
  return x;
}
static inline v16 keep_factor(const dropout *dr, int i, int j) {
  const v16i ctr = (LANE + j) + i * 4096;
  const v16i x = fmix(fmix(ctr ^ (int)dr->k0) ^ (int)dr->k1);
  /* the top 24 bits as a number in [0, 1) (convertvector converts; a cast would reinterpret) */
  const v16 u = __builtin_convertvector((v16i)((__v16su)x >> 8), v16) * (1.0f / 16777216.0f);
  return vselect(u >= splat(dr->p), splat(dr->keep), (v16){0});
}
static dropout dropout_for(float p, uint64_t seed, int row, int head) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t)(row * 65536 + head + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull; /* splitmix64: the task's two keys */
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  dropout d = {(uint32_t)z, (uint32_t)(z >> 32), p, p > 0 ? 1.0f / (1.0f - p) : 1.0f};
  return d;
}

/* The task's softmax: P[i][j] = exp(S[i][j] - m_i) for j <= i (unnormalised), 0 past it;
 * rs[i] = 1 / sum_j, lse[i] = m_i + log(sum_j). */
static void softmax_rows(float *S, int sp, int s, float *rs, float *lse) {
  for (int i = 0; i < s; i++) {
    float *row = S + (size_t)i * sp;
    const int last = i & ~15; /* the block holding the diagonal */
    const v16 ninf = splat(-INFINITY);
    v16 mx = ninf;
    for (int j = 0; j < last; j += 16)
      mx = vselect(*(v16 *)(row + j) > mx, *(v16 *)(row + j), mx);
    const v16i keep = LANE + last <= i;
    const v16 tail = vselect(keep, *(v16 *)(row + last), ninf);
    mx = vselect(tail > mx, tail, mx);
    const float top = hmax(mx);
    v16 tot = {0};
    for (int j = 0; j < last; j += 16) {
      const v16 e = vexp(*(v16 *)(row + j) - top);
      *(v16 *)(row + j) = e;
      tot += e;
    }
    const v16 e = vselect(keep, vexp(*(v16 *)(row + last) - top), (v16){0});
    *(v16 *)(row + last) = e;
    tot += e;
    if (last + 16 < sp)
      *(v16 *)(row + last + 16) = (v16){0};
    const float total = hsum(tot);
    rs[i] = 1.0f / total;
    lse[i] = top + logf(total);
  }
}

/* P[i][j] = exp(S[i][j] - lse[i]) for j <= i, 0 past it (to the end of the next block) */
static void probabilities(float *S, int sp, int s, const float *lse) {
  for (int i = 0; i < s; i++) {
    float *row = S + (size_t)i * sp;
    const int last = i & ~15;
    const v16 l = splat(lse[i]);
    for (int j = 0; j < last; j += 16)
      *(v16 *)(row + j) = vexp(*(v16 *)(row + j) - l);
    *(v16 *)(row + last) = vselect(LANE + last <= i, vexp(*(v16 *)(row + last) - l), (v16){0});
    if (last + 16 < sp)
      *(v16 *)(row + last + 16) = (v16){0};
  }
}

/* A task's start in both passes: its q, k, v into the scratch, k transposed, and the scores
 * S = Q K^T / sqrt(hd) of the causal triangle in w->P. */
static void task_scores(const float *q, long ldt, int s, int hd, float scale, scratch *w) {
  const int sp = round_up(s, 32);
  copy_rows(q, ldt, s, hd, w->Q);
  copy_rows(q + hd, ldt, s, hd, w->K);
  copy_rows(q + 2 * hd, ldt, s, hd, w->V);
  transpose(w->K, round_up(s, 16), hd, sp, w->KT);
  scores(w->Q, w->KT, sp, round_up(s, 8), hd, scale, w->P);
}

/* The forward. qkv: token t of batch row r, head h at qkv + t*ldt + r*ldr + h*3*hd (its q, k
 * and v, hd floats each); ctx (out) at t*ldot + r*ldor + h*hd; lse (out) [b][nh][s], each
 * query's log-sum-exp, which the backward recomputes the probabilities from. Returns 0, or -1
 * when a thread's scratch could not be allocated (the outputs are then incomplete). */
int attn_train_fwd(const float *qkv, long ldt, long ldr, float *ctx, long ldot, long ldor,
                   float *lse, int b, int s, int nh, int hd, float p, uint64_t seed, int head0,
                   int threads) {
  const int sp = round_up(s, 32);
  const float scale = 1.0f / sqrtf((float)hd);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    scratch w = scratch_new(s, hd);
    if (!w.Q)
      failed = 1;
#pragma omp for schedule(static)
    for (int task = 0; task < b * nh; task++) {
      if (!w.Q)
        continue;
      const int r = task / nh, h = task % nh;
      task_scores(qkv + (size_t)r * ldr + (size_t)h * 3 * hd, ldt, s, hd, scale, &w);
      softmax_rows(w.P, sp, s, w.row, lse + (size_t)task * s);
      if (p > 0) { /* the dropped probabilities (the sums above are over all of them) */
        const dropout dr = dropout_for(p, seed, r, head0 + h);
        for (int i = 0; i < s; i++)
          for (int j = 0; j <= i; j += 16)
            *(v16 *)(w.P + (size_t)i * sp + j) *= keep_factor(&dr, i, j);
      }
      product(PVS, w.P, sp, s, w.V, hd, ctx + (size_t)r * ldor + (size_t)h * hd, ldot, w.row);
    }
    free(w.Q);
  }
  return failed ? -1 : 0;
}

/* The backward: dctx (the gradient of ctx, laid out as ctx) -> dqkv (laid out as qkv; every
 * element written). ctx and lse are the forward's. Returns 0, or -1 as the forward. */
int attn_train_bwd(const float *qkv, long ldt, long ldr, const float *ctx, const float *dctx,
                   long ldot, long ldor, const float *lse, float *dqkv, int b, int s, int nh,
                   int hd, float p, uint64_t seed, int head0, int threads) {
  const int sp = round_up(s, 32), s16 = round_up(s, 16), s8 = round_up(s, 8);
  const float scale = 1.0f / sqrtf((float)hd);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    scratch w = scratch_new(s, hd);
    if (!w.Q)
      failed = 1;
#pragma omp for schedule(static)
    for (int task = 0; task < b * nh; task++) {
      if (!w.Q)
        continue;
      const int r = task / nh, h = task % nh;
      const size_t off = (size_t)r * ldr + (size_t)h * 3 * hd;
      const size_t ooff = (size_t)r * ldor + (size_t)h * hd;
      task_scores(qkv + off, ldt, s, hd, scale, &w);
      copy_rows(dctx + ooff, ldot, s, hd, w.G);
      transpose(w.V, s16, hd, sp, w.VT);
      probabilities(w.P, sp, s, lse + (size_t)task * s);
      scores(w.G, w.VT, sp, s8, hd, 1.0f, w.D); /* dP = dO V^T (of the dropped P) */
      const dropout dr = dropout_for(p, seed, r, head0 + h);
      for (int i = 0; i < s; i++) {
        v16 acc = {0};
        for (int c = 0; c < hd; c += 16)
          acc += *(const v16 *)(w.G + (size_t)i * hd + c) *
                 *(const v16 *)(ctx + ooff + (size_t)i * ldot + c);
        const v16 di = splat(hsum(acc)); /* D_i = dO_i . O_i */
        float *dp = w.D + (size_t)i * sp;
        const float *pp = w.P + (size_t)i * sp;
        const int last = i & ~15;
        if (p > 0) {
          float *pd = w.P + (size_t)i * sp;
          for (int j = 0; j <= last; j += 16) { /* dS from P, then P becomes the dropped P */
            const v16 m = keep_factor(&dr, i, j);
            *(v16 *)(dp + j) = *(const v16 *)(pd + j) * (*(v16 *)(dp + j) * m - di) * scale;
            *(v16 *)(pd + j) *= m;
          }
        } else {
          for (int j = 0; j <= last; j += 16) /* P is 0 past the diagonal: so is dS */
            *(v16 *)(dp + j) = *(const v16 *)(pp + j) * (*(v16 *)(dp + j) - di) * scale;
        }
        if (last + 16 < sp)
          *(v16 *)(dp + last + 16) = (v16){0};
      }
      float *d = dqkv + off;
      product(PTXS, w.P, sp, s, w.G, hd, d + 2 * hd, ldt, 0); /* dV = P^T dO (dropped P) */
      product(PTXS, w.D, sp, s, w.Q, hd, d + hd, ldt, 0);     /* dK = scale dS^T Q */
      product(PVS, w.D, sp, s, w.K, hd, d, ldt, 0);           /* dQ = scale dS K */
    }
    free(w.Q);
  }
  return failed ? -1 : 0;
}
