// spfde: direct sparse 2-D convolution (forward, input gradient, weight gradient) on CPU.
//
// Plain C++ with extern "C" entry points on raw float pointers: no torch headers, so no ABI or
// build-isolation trouble. Built by spfde/sparsity/kernels/native.py with the machine's compiler
// (-O3 -march=native -fopenmp) and called through ctypes, which releases the GIL.
//
// Layout. The batch is cut into blocks of V = 16 samples. Each block is transposed into a scratch
// buffer [C][H][W][V] with the samples innermost (zero lanes past a short last batch), so every
// multiply-add works on a vector of 16 samples with one weight (SparseProp's idea, Nikdan et al.
// 2023); the result is transposed back into the caller's layout (NCHW, channels_last or any
// strides) block by block, so the scratch stays in cache and the op moves no more memory than a
// dense convolution does. Zero padding is explicit in the scratch (margins around the packed
// output gradient for the input gradient), so the inner loops have no bounds checks.
//
// Work is proportional to the nonzeros: every kernel loops over the nonzero weights only.
//   forward      CSR rows (output channels); each output vector is accumulated in registers
//                over the row's nonzeros and stored once; parallel over output positions.
//   input grad   CSC columns (input channels), split by stride-parity class so the gather
//                needs no divisibility test; also stored once; parallel over input positions.
//   weight grad  CSR rows; each nonzero's dot product over (output positions, samples) within a
//                batch block is owned by one thread; the blocks' shares are summed in block order.
// Threads run whole batch blocks when there are enough of them, else share each block. No thread
// ever sums into memory another thread writes, and every sum runs in the same order whatever the
// thread count, so results are bit-identical for any number of threads.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <type_traits>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#else
static inline int omp_get_thread_num() { return 0; }
static inline int omp_get_num_threads() { return 1; }
#endif

typedef int64_t i64;

constexpr int V = 16;
typedef float vf __attribute__((vector_size(V * sizeof(float))));
typedef float vfu __attribute__((vector_size(V * sizeof(float)), aligned(4)));

#if defined(__AVX512F__)
constexpr int R = 8;  // output positions per register block: R accumulators of V floats
#else
constexpr int R = 4;
#endif

static inline vf ld(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void st(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// A broadcast, not vf{} + a: the add is an extra instruction per nonzero in the inner loops.
// v as a value the compiler must have rounded: no multiply-add contracts across it (a residual's add
// after a product is then the separate add PyTorch's would be, bit for bit).
template <class T>
static inline T rounded(T v) {
  asm("" : "+m"(v));
  return v;
}

static inline vf splat(float a) { return vf{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
static_assert(V == 16, "splat lists V lanes");

// f(0), f(1), ..., f(B - 1) with compile-time indices. Register blocks are arrays of B vectors
// indexed only through this: GCC keeps such an array in registers, but one indexed by a loop
// variable stays in memory (zeroed there at entry, stored and reloaded before the result is
// stored), which cost 7-25% of a sparse Linear's row loop (ViT-preset shapes, one thread).
template <class F, int... I>
static inline void unrolled_(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int B, class F>
static inline void unrolled(F&& f) {
  unrolled_(f, std::make_integer_sequence<int, B>{});
}

typedef int32_t vi __attribute__((vector_size(V * sizeof(int32_t))));

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial, 2^n from
// the exponent bits (relative error below 2e-7; inputs below -87.3, where the true value is under
// 1.2e-38, give about 1.2e-38).
static inline vf vexp_neg(vf x) {
  const vf lo = splat(-87.33654f);
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: (t + magic) - magic rounds t to an integer
  const vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf f;
  std::memcpy(&f, &e, sizeof(f));
  return p * f;
}


// GELU, erf form (nn.GELU's default), and its derivative on V lanes: gelu(h) = h * Phi(h) and
// gelu'(h) = Phi(h) + h * phi(h). erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7,
// the formula of PyTorch's vectorized CPU erf); exp(-h^2 / 2) serves both the erf and phi.
static inline void vgelu(vf h, vf& out, vf& deriv) {
  const vf zero = vf{}, x = h * 0.70710678118654752f;
  const vf ax = x < zero ? -x : x;
  const vf t = 1.0f / (ax * 0.3275911f + 1.0f);
  vf p = splat(1.061405429f);
  p = p * t + -1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t + -0.284496736f;
  p = p * t + 0.254829592f;
  // exp(-x^2), exactly 0 where vexp_neg's clamp would leave ~1e-38 (else h * e grows for huge |h|)
  const vf e = x * x > splat(87.0f) ? zero : vexp_neg(-(x * x));
  const vf q = p * t * e;                        // erfc(|x|)
  const vf cdf2 = x < zero ? q : 2.0f - q;       // 1 + erf(x) = 2 Phi(h)
  out = h * cdf2 * 0.5f;
  deriv = cdf2 * 0.5f + h * e * 0.3989422804014327f;
}

// dst[r * dstep + 0..V) = sum_k w[k] * src[off[k] + r * sstep + 0..V) for r in [0, B)
template <int B>
static inline void gather_acc(const float* __restrict src, i64 sstep, const i64* __restrict off,
                              const float* __restrict w, i64 n, float* __restrict dst, i64 dstep) {
  vf acc[B];
  unrolled<B>([&](auto r) { acc[r] = vf{}; });
  for (i64 k = 0; k < n; ++k) {
    const float* p = src + off[k];
    const vf wk = splat(w[k]);
    unrolled<B>([&](auto r) { acc[r] += wk * ld(p + r * sstep); });
  }
  unrolled<B>([&](auto r) { st(dst + r * dstep, acc[r]); });
}

// `count` output positions in a row, R at a time, the rest in smaller blocks
static void gather_row(const float* src, i64 sstep, const i64* off, const float* w, i64 n, float* dst,
                       i64 dstep, i64 count) {
  i64 b = 0;
  for (; b + R <= count; b += R) gather_acc<R>(src + b * sstep, sstep, off, w, n, dst + b * dstep, dstep);
  if (R > 4 && b + 4 <= count) {
    gather_acc<4>(src + b * sstep, sstep, off, w, n, dst + b * dstep, dstep);
    b += 4;
  }
  if (b + 2 <= count) {
    gather_acc<2>(src + b * sstep, sstep, off, w, n, dst + b * dstep, dstep);
    b += 2;
  }
  if (b < count) gather_acc<1>(src + b * sstep, sstep, off, w, n, dst + b * dstep, dstep);
}

// acc[k] += sum_r g[r] * x[off[k] + r * sstep] for a block of B output positions
template <int B>
static inline void dot_block(const float* __restrict g, const float* __restrict x, i64 sstep,
                             const i64* __restrict off, i64 n, float* __restrict acc) {
  vf gr[B];
  unrolled<B>([&](auto r) { gr[r] = ld(g + r * V); });
  for (i64 k = 0; k < n; ++k) {
    const float* p = x + off[k];
    vf t0 = ld(acc + k * V), t1 = vf{};
    unrolled<B / 2>([&](auto h) {
      t0 += gr[2 * h] * ld(p + 2 * h * sstep);
      t1 += gr[2 * h + 1] * ld(p + (2 * h + 1) * sstep);
    });
    if (B % 2) t0 += gr[B - 1] * ld(p + (B - 1) * sstep);
    st(acc + k * V, t0 + t1);
  }
}

static void zero_positions(float* dst, i64 dstep, i64 count) {
  for (i64 b = 0; b < count; ++b) st(dst + b * dstep, vf{});
}

// Transposing copies of tiles of at most 16 x 16 floats move data between (sample, column) or
// (sample, channel) tiles of the caller's layout and the batch-innermost layout.
#if defined(__AVX512F__)
#include <immintrin.h>
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}
#endif

// dst row j (j < nd), lane i (i < nl) = src row i, column j, + (addv ? addv[i] : adds), then
// + res row j, lane i (row stride rs) when res is not NULL (a residual: y + x is x + y bit for bit).
// Source rows i >= ni and columns j >= nj read as zero.
static inline void tile(const float* __restrict src, i64 ss, int ni, int nj, float* __restrict dst, i64 ds, int nd,
                        int nl, const float* addv, float adds, const float* res = nullptr, i64 rs = 0) {
#if defined(__AVX512F__)
  const __mmask16 in_mask = __mmask16((1u << nj) - 1u), out_mask = __mmask16((1u << nl) - 1u);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < ni ? _mm512_maskz_loadu_ps(in_mask, src + i * ss) : _mm512_setzero_ps();
  transpose16(r);
  const __m512 a = addv ? _mm512_maskz_loadu_ps(out_mask, addv) : _mm512_set1_ps(adds);
  if (res)
    for (int j = 0; j < nd; ++j)
      _mm512_mask_storeu_ps(dst + j * ds, out_mask,
                            _mm512_add_ps(_mm512_add_ps(r[j], a), _mm512_maskz_loadu_ps(out_mask, res + j * rs)));
  else
    for (int j = 0; j < nd; ++j) _mm512_mask_storeu_ps(dst + j * ds, out_mask, _mm512_add_ps(r[j], a));
#else
  for (int j = 0; j < nd; ++j)
    for (int i = 0; i < nl; ++i) {
      const float v = (i < ni && j < nj ? src[i * ss + j] : 0.0f) + (addv ? addv[i] : adds);
      dst[j * ds + i] = res ? v + res[j * rs + i] : v;
    }
#endif
}


static float* alloc_floats(i64 n, bool zero) {
  void* p = nullptr;
  const size_t bytes = size_t((n > 0 ? n : 1) * i64(sizeof(float)) + 63) / 64 * 64;
  if (posix_memalign(&p, 64, bytes) != 0) return nullptr;
  if (zero) std::memset(p, 0, bytes);
  return static_cast<float*>(p);
}

// An activation (N, C, H, W) with element strides.
struct Act {
  float* p;
  i64 N, C, H, W, sN, sC, sH, sW;
  bool channels_last() const { return sC == 1 && C > 1; }
  // work units of a block copy: one spatial row (channels_last) or one (channel, row)
  i64 units() const { return channels_last() ? H : C * H; }
};

// Copy unit u of batch block nb into blk [C][Hp][Wp][V] at offset (pt, pl); lanes past the batch's
// end are written as zeros. Padding positions are never written (the caller zeroes them once).
static void pack_unit(const Act& a, i64 nb, i64 u, float* blk, i64 Hp, i64 Wp, i64 pt, i64 pl) {
  const int nv = int(a.N - nb * V < V ? a.N - nb * V : V);
  const float* base = a.p + nb * V * a.sN;
  const i64 plane = Hp * Wp * V;
  if (a.channels_last()) {
    const i64 y = u;
    for (i64 xx = 0; xx < a.W; ++xx)
      for (i64 c0 = 0; c0 < a.C; c0 += V) {
        const int k = int(a.C - c0 < V ? a.C - c0 : V);
        tile(base + y * a.sH + xx * a.sW + c0, a.sN, nv, k, blk + c0 * plane + ((y + pt) * Wp + xx + pl) * V, plane,
             k, V, nullptr, 0.0f);
      }
    return;
  }
  const i64 c = u / a.H, y = u % a.H;
  float* row = blk + c * plane + ((y + pt) * Wp + pl) * V;
  const float* src = base + c * a.sC + y * a.sH;
  if (a.sW == 1) {
    for (i64 x0 = 0; x0 < a.W; x0 += V) {
      const int k = int(a.W - x0 < V ? a.W - x0 : V);
      tile(src + x0, a.sN, nv, k, row + x0 * V, V, k, V, nullptr, 0.0f);
    }
    return;
  }
  for (i64 xx = 0; xx < a.W; ++xx)
    for (int v = 0; v < V; ++v) row[xx * V + v] = v < nv ? src[v * a.sN + xx * a.sW] : 0.0f;
}

// Copy unit u of blk [C][H][W][V] back into batch block nb of a, adding bias[c] when given.
static void unpack_unit(const float* blk, const Act& a, i64 nb, i64 u, const float* bias) {
  const int nv = int(a.N - nb * V < V ? a.N - nb * V : V);
  float* base = a.p + nb * V * a.sN;
  const i64 plane = a.H * a.W * V;
  if (a.channels_last()) {
    const i64 y = u;
    for (i64 xx = 0; xx < a.W; ++xx)
      for (i64 c0 = 0; c0 < a.C; c0 += V) {
        const int k = int(a.C - c0 < V ? a.C - c0 : V);
        tile(blk + c0 * plane + (y * a.W + xx) * V, plane, k, V, base + y * a.sH + xx * a.sW + c0, a.sN, nv, k,
             bias ? bias + c0 : nullptr, 0.0f);
      }
    return;
  }
  const i64 c = u / a.H, y = u % a.H;
  const float* row = blk + c * plane + y * a.W * V;
  float* dst = base + c * a.sC + y * a.sH;
  const float b = bias ? bias[c] : 0.0f;
  if (a.sW == 1) {
    for (i64 x0 = 0; x0 < a.W; x0 += V) {
      const int k = int(a.W - x0 < V ? a.W - x0 : V);
      tile(row + x0 * V, V, k, V, dst + x0, a.sN, nv, k, nullptr, b);
    }
    return;
  }
  for (i64 xx = 0; xx < a.W; ++xx)
    for (int v = 0; v < nv; ++v) dst[v * a.sN + xx * a.sW] = row[xx * V + v] + b;
}

// acc += weight gradient contributions of one batch block for output channels [lo, hi), then
// partial[k] = the lane sum of acc[k] (acc is zeroed first): the block's share of every gradient.
static void weight_grad_block(const float* xb, i64 Wp, const float* gb, i64 Gh, i64 Gw, i64 mt, i64 ml,
                              i64 OH, i64 OW, i64 sh, i64 sw, const int32_t* rowptr, const i64* off, i64 lo, i64 hi,
                              float* accbuf, float* partial) {
  if (lo >= hi) return;
  std::memset(accbuf + rowptr[lo] * V, 0, sizeof(float) * (rowptr[hi] - rowptr[lo]) * V);
  for (i64 oy = 0; oy < OH; ++oy) {
    const float* g0 = gb + ((oy + mt) * Gw + ml) * V;
    const float* x = xb + oy * sh * Wp * V;
    for (i64 ox0 = 0; ox0 < OW; ox0 += R) {
      const i64 cnt = OW - ox0 < R ? OW - ox0 : R;
      const float* xo = x + ox0 * sw * V;
      for (i64 oc = lo; oc < hi; ++oc) {
        const i64 s = rowptr[oc], n = rowptr[oc + 1] - s;
        if (n == 0) continue;
        const float* g = g0 + oc * Gh * Gw * V + ox0 * V;
        float* acc = accbuf + s * V;
        const i64* o = off + s;
        i64 r = 0;
        for (; r + R <= cnt; r += R) dot_block<R>(g + r * V, xo + r * sw * V, sw * V, o, n, acc);
        if (R > 4 && r + 4 <= cnt) {
          dot_block<4>(g + r * V, xo + r * sw * V, sw * V, o, n, acc);
          r += 4;
        }
        if (r + 2 <= cnt) {
          dot_block<2>(g + r * V, xo + r * sw * V, sw * V, o, n, acc);
          r += 2;
        }
        if (r < cnt) dot_block<1>(g + r * V, xo + r * sw * V, sw * V, o, n, acc);
      }
    }
  }
  for (i64 k = rowptr[lo]; k < rowptr[hi]; ++k) {
    float t = 0.0f;
    for (int v = 0; v < V; ++v) t += accbuf[k * V + v];
    partial[k] = t;
  }
}

// Output rows [oy0, oy1) of one batch block of the forward.
static void forward_rows(const float* xb, i64 Wp, i64 OC, i64 OH, i64 OW, i64 sh, i64 sw, const int32_t* rowptr,
                         const i64* off, const float* vals, float* yb, i64 oy0, i64 oy1) {
  for (i64 oy = oy0; oy < oy1; ++oy)
    for (i64 ox0 = 0; ox0 < OW; ox0 += R) {
      const i64 cnt = OW - ox0 < R ? OW - ox0 : R;
      const float* src = xb + (oy * sh * Wp + ox0 * sw) * V;
      for (i64 oc = 0; oc < OC; ++oc) {
        const i64 s = rowptr[oc], n = rowptr[oc + 1] - s;
        float* dst = yb + ((oc * OH + oy) * OW + ox0) * V;
        if (n == 0)
          zero_positions(dst, V, cnt);
        else
          gather_row(src, sw * V, off + s, vals + s, n, dst, V, cnt);
      }
    }
}

// Input rows [iy0, iy1) of one batch block of the input gradient.
static void input_grad_rows(const float* gb, i64 Gw, i64 C, i64 H, i64 W, i64 sh, i64 sw, const int32_t* colptr,
                            const i64* coff, const float* cw, float* gxb, i64 iy0, i64 iy1) {
  for (i64 iy = iy0; iy < iy1; ++iy) {
    const i64 py = iy % sh, a = iy / sh;
    const float* g = gb + a * Gw * V;
    for (i64 px = 0; px < sw; ++px) {
      const i64 nB = W > px ? (W - px + sw - 1) / sw : 0;
      for (i64 b0 = 0; b0 < nB; b0 += R) {
        const i64 cnt = nB - b0 < R ? nB - b0 : R;
        for (i64 c = 0; c < C; ++c) {
          const i64 cls = (c * sh + py) * sw + px;
          const i64 s = colptr[cls], n = colptr[cls + 1] - s;
          float* dst = gxb + ((c * H + iy) * W + sw * b0 + px) * V;
          if (n == 0)
            zero_positions(dst, sw * V, cnt);
          else
            gather_row(g + b0 * V, V, coff + s, cw + s, n, dst, sw * V, cnt);
        }
      }
    }
  }
}

// With enough batch blocks each thread runs whole blocks with its own scratch (no barrier inside
// the call); otherwise all threads share one block at a time. Either way every output element is
// computed by one thread in the same order, so the results do not depend on the choice.
static bool own_blocks(i64 NB, int nthreads) { return nthreads > 1 && (NB % nthreads == 0 || NB >= 2 * nthreads); }

// Scratch of `count` equal slices (one per thread in own-block mode), 64-byte aligned, optionally zeroed.
struct Scratch {
  float* p = nullptr;
  i64 slice = 0;
  Scratch(i64 n, int count, bool zero) : slice((n + 15) / 16 * 16) {
    p = count ? alloc_floats(slice * count, zero) : nullptr;
  }
  ~Scratch() { free(p); }
  float* at(int t) const { return p + t * slice; }
};

extern "C" {

int spfde_abi_version() { return 14; }
int spfde_vector_width() { return V; }

// y = conv2d(x, W, bias) for the nonzeros of W in CSR order (row = output channel): rowptr[OC + 1]
// and, per nonzero, its input channel ic, tap ky/kx and value. Returns 0, or 1 when out of memory.
int spfde_conv2d_forward(const float* x, i64 N, i64 C, i64 H, i64 W, i64 xsN, i64 xsC, i64 xsH, i64 xsW, i64 OC,
                         i64 OH, i64 OW, i64 sh, i64 sw, i64 ph, i64 pw, const int32_t* rowptr, const int32_t* ic,
                         const int32_t* ky, const int32_t* kx, const float* vals, const float* bias, float* y,
                         i64 ysN, i64 ysC, i64 ysH, i64 ysW, int nthreads) {
  const Act xa{const_cast<float*>(x), N, C, H, W, xsN, xsC, xsH, xsW};
  const Act ya{y, N, OC, OH, OW, ysN, ysC, ysH, ysW};
  const i64 NB = (N + V - 1) / V, Hp = H + 2 * ph, Wp = W + 2 * pw, nnz = rowptr[OC];
  std::vector<i64> off(nnz > 0 ? nnz : 1);
  for (i64 k = 0; k < nnz; ++k) off[k] = ((i64(ic[k]) * Hp + ky[k]) * Wp + kx[k]) * V;
  const bool own = own_blocks(NB, nthreads);
  const int slices = own ? nthreads : 1;
  Scratch xs(C * Hp * Wp * V, slices, true), ys(OC * OH * OW * V, slices, false);
  if (!xs.p || !ys.p) return 1;
  if (own) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 nb = 0; nb < NB; ++nb) {
      const int t = omp_get_thread_num();
      float *xb = xs.at(t), *yb = ys.at(t);
      for (i64 u = 0; u < xa.units(); ++u) pack_unit(xa, nb, u, xb, Hp, Wp, ph, pw);
      forward_rows(xb, Wp, OC, OH, OW, sh, sw, rowptr, off.data(), vals, yb, 0, OH);
      for (i64 u = 0; u < ya.units(); ++u) unpack_unit(yb, ya, nb, u, bias);
    }
    return 0;
  }
  float *xb = xs.at(0), *yb = ys.at(0);
#pragma omp parallel num_threads(nthreads)
  for (i64 nb = 0; nb < NB; ++nb) {
#pragma omp for schedule(static)
    for (i64 u = 0; u < xa.units(); ++u) pack_unit(xa, nb, u, xb, Hp, Wp, ph, pw);
#pragma omp for schedule(static)
    for (i64 oy = 0; oy < OH; ++oy) forward_rows(xb, Wp, OC, OH, OW, sh, sw, rowptr, off.data(), vals, yb, oy, oy + 1);
#pragma omp for schedule(static)
    for (i64 u = 0; u < ya.units(); ++u) unpack_unit(yb, ya, nb, u, bias);
  }
  return 0;
}

// Gradients of the forward above: gx (skipped when NULL) and gw, the weight gradient at the
// nonzeros in CSR order (skipped when NULL). The input gradient reads the nonzeros in CSC order
// grouped by (input channel, row parity py, column parity px), py = (ky - ph) mod sh and
// px = (kx - pw) mod sw: colptr[C * sh * sw + 1]; cidx[j] is the nonzero's CSR position. Input
// position (sh*a + py, sw*b + px) gathers gy[oc][a + dy][b + dx], dy = (py + ph - ky) / sh and
// dx = (px + pw - kx) / sw (exact divisions), from gy packed with zero margins mt/mb/ml/mr.
// gw[k] sums the batch blocks' shares in block order.
int spfde_conv2d_backward(const float* x, i64 xsN, i64 xsC, i64 xsH, i64 xsW, const float* gy, i64 gsN, i64 gsC,
                          i64 gsH, i64 gsW, i64 N, i64 C, i64 H, i64 W, i64 OC, i64 OH, i64 OW, i64 sh, i64 sw,
                          i64 ph, i64 pw, i64 mt, i64 mb, i64 ml, i64 mr, const int32_t* rowptr, const int32_t* ic,
                          const int32_t* ky, const int32_t* kx, const float* vals, const int32_t* colptr,
                          const int32_t* cidx, const int32_t* coc, const int32_t* cky, const int32_t* ckx,
                          float* gx, i64 dsN, i64 dsC, i64 dsH, i64 dsW, float* gw, int nthreads) {
  const Act xa{const_cast<float*>(x), N, C, H, W, xsN, xsC, xsH, xsW};
  const Act ga{const_cast<float*>(gy), N, OC, OH, OW, gsN, gsC, gsH, gsW};
  const Act da{gx, N, C, H, W, dsN, dsC, dsH, dsW};
  const i64 NB = (N + V - 1) / V, Hp = H + 2 * ph, Wp = W + 2 * pw, Gh = OH + mt + mb, Gw = OW + ml + mr;
  const i64 nnz = rowptr[OC];
  std::vector<i64> off(nnz > 0 ? nnz : 1), coff(nnz > 0 ? nnz : 1);
  std::vector<float> cw(nnz > 0 ? nnz : 1);
  for (i64 k = 0; k < nnz; ++k) off[k] = ((i64(ic[k]) * Hp + ky[k]) * Wp + kx[k]) * V;
  for (i64 j = 0; j < nnz; ++j) {
    const i64 py = ((cky[j] - ph) % sh + sh) % sh, px = ((ckx[j] - pw) % sw + sw) % sw;
    const i64 dy = (py + ph - cky[j]) / sh, dx = (px + pw - ckx[j]) / sw;
    coff[j] = ((i64(coc[j]) * Gh + dy + mt) * Gw + dx + ml) * V;
    cw[j] = vals[cidx[j]];
  }
  const bool own = own_blocks(NB, nthreads);
  const int slices = own ? nthreads : 1;
  Scratch gs(OC * Gh * Gw * V, slices, true), xs(C * Hp * Wp * V, gw ? slices : 0, true),
      dxs(C * H * W * V, gx ? slices : 0, false), accs(nnz * V, gw ? slices : 0, false),
      parts(NB * nnz, gw ? 1 : 0, false);
  if (!gs.p || (gw && (!xs.p || !accs.p || !parts.p)) || (gx && !dxs.p)) return 1;
  if (own) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 nb = 0; nb < NB; ++nb) {
      const int t = omp_get_thread_num();
      float* gb = gs.at(t);
      for (i64 u = 0; u < ga.units(); ++u) pack_unit(ga, nb, u, gb, Gh, Gw, mt, ml);
      if (gx) {
        float* gxb = dxs.at(t);
        input_grad_rows(gb, Gw, C, H, W, sh, sw, colptr, coff.data(), cw.data(), gxb, 0, H);
        for (i64 u = 0; u < da.units(); ++u) unpack_unit(gxb, da, nb, u, nullptr);
      }
      if (gw) {
        float* xb = xs.at(t);
        for (i64 u = 0; u < xa.units(); ++u) pack_unit(xa, nb, u, xb, Hp, Wp, ph, pw);
        weight_grad_block(xb, Wp, gb, Gh, Gw, mt, ml, OH, OW, sh, sw, rowptr, off.data(), 0, OC, accs.at(t),
                          parts.at(0) + nb * nnz);
      }
    }
  } else {
    float *gb = gs.at(0), *xb = gw ? xs.at(0) : nullptr, *gxb = gx ? dxs.at(0) : nullptr;
#pragma omp parallel num_threads(nthreads)
    {
      // weight gradient: this thread's output channels, balanced by nonzeros
      const i64 t = omp_get_thread_num(), T = omp_get_num_threads();
      i64 lo = 0;
      while (lo < OC && rowptr[lo] * T < t * nnz) ++lo;
      i64 hi = lo;
      while (hi < OC && rowptr[hi] * T < (t + 1) * nnz) ++hi;
      if (t == T - 1) hi = OC;
      for (i64 nb = 0; nb < NB; ++nb) {
#pragma omp for schedule(static) nowait
        for (i64 u = 0; u < ga.units(); ++u) pack_unit(ga, nb, u, gb, Gh, Gw, mt, ml);
        if (gw) {
#pragma omp for schedule(static) nowait
          for (i64 u = 0; u < xa.units(); ++u) pack_unit(xa, nb, u, xb, Hp, Wp, ph, pw);
        }
#pragma omp barrier
        if (gx) {
#pragma omp for schedule(static)
          for (i64 iy = 0; iy < H; ++iy)
            input_grad_rows(gb, Gw, C, H, W, sh, sw, colptr, coff.data(), cw.data(), gxb, iy, iy + 1);
#pragma omp for schedule(static) nowait
          for (i64 u = 0; u < da.units(); ++u) unpack_unit(gxb, da, nb, u, nullptr);
        }
        if (gw)
          weight_grad_block(xb, Wp, gb, Gh, Gw, mt, ml, OH, OW, sh, sw, rowptr, off.data(), lo, hi, accs.at(0),
                            parts.at(0) + nb * nnz);
#pragma omp barrier
      }
    }
  }
  if (gw) {
    const float* part = parts.at(0);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 k = 0; k < nnz; ++k) {
      float t = 0.0f;
      for (i64 nb = 0; nb < NB; ++nb) t += part[nb * nnz + k];
      gw[k] = t;
    }
  }
  return 0;
}

}  // extern "C"

// =============================================================================================
// Sparse Linear: y = x W^T + b with W's nonzeros in CSR order (row = output feature), x (N, I) with
// unit column stride and any row stride (N = all leading dimensions flattened: samples, tokens).
//
// Layout. The N rows are cut into tiles of up to R vectors of V rows (R * V = 128 rows with
// AVX-512), balanced so that the last tile is at most one vector shorter than the others. A tile
// of x is transposed into a scratch [feature][tile width] with the rows innermost (zero lanes past
// the last row), the convolution's batch-innermost idea: every multiply-add is a V-wide FMA with
// one weight, the R vectors of one feature are contiguous, and the tile (features x 512 bytes)
// stays in L2 while it is used.
// Synchronisation. A call has one barrier at most (short of 64 MiB of packed rows): a barrier
// costs a futex wake-up of the other threads once they stop spinning (always under
// OMP_WAIT_POLICY=PASSIVE, which the CLI sets, and often in a VM), 5-20 us each on a 2-vCPU
// machine, against a forward of 50-100 us on a ViT's 64-wide layers. (The first version packed
// one shared tile at a time behind a barrier, 17 per call at 2176 rows: under the passive policy
// two threads were slower than one.)
//   forward      with at least two tiles per thread, each thread takes whole tiles: it packs the
//                tile into its own scratch and computes every output feature of those rows (no
//                barrier). With fewer tiles, all tiles are packed first (one barrier) and the
//                threads share (tile, 16-feature group) units. CSR rows: each output feature's
//                (up to R) vectors accumulate in registers over the row's nonzeros and are stored
//                once into a 16-feature scratch, which 16 x 16 register transposes write into y
//                (adding the bias).
//   input grad   the same kernel on the packed output gradient over the CSC (transposed)
//                structure; every tile of gy (and of x, for the weight gradient) is packed first,
//                then the one barrier (in groups of tiles, one barrier each, beyond 64 MiB of
//                packed rows; one thread: tile by tile, each tile used while in cache).
//   weight grad  at the nonzeros only: nonzero (o, i)'s gradient is the dot product of packed gy
//                row o and packed x row i over all N rows. gy's vectors of row o stay in registers
//                while the row's nonzeros stream x; each nonzero's vector sum is carried across
//                tiles (acc[nonzero][V]) and lane-summed in a fixed tree after the last tile, then
//                written into the dense weight gradient (whose rows the same thread zeroes).
//                Parallel over chunks of consecutive rows with about equal nonzero counts, each
//                chunk walking every tile.
// Every output element and every nonzero's gradient is computed by one thread, in an order fixed
// by the shapes and the mask alone (the tiling never changes a sum's order), so the results are
// bit-identical for any thread count.

namespace {

// A fused call's two weights' values at their nonzeros, in CSR order (v[k] = w[woff[k]], woff the
// storage offsets of the nonzeros), inside the call's parallel region (a barrier at the end): the
// caller passes the dense weights, so it gathers nothing itself (two index_selects a call in Python).
inline void gather_values(const float* w1, const i64* woff1, i64 n1, float* v1, const float* w2, const i64* woff2,
                          i64 n2, float* v2) {
#pragma omp for schedule(static) nowait
  for (i64 k = 0; k < n1; ++k) v1[k] = w1[woff1[k]];
#pragma omp for schedule(static)
  for (i64 k = 0; k < n2; ++k) v2[k] = w2[woff2[k]];
}

struct Tiles {
  i64 N = 0, nvec = 0, count = 0, vecs = 0;  // rows, V-vectors, tiles, vectors per full tile
  i64 width() const { return vecs * V; }
  i64 vectors(i64 t) const { return nvec - t * vecs < vecs ? nvec - t * vecs : vecs; }
};

Tiles make_tiles(i64 N) {
  Tiles tl;
  tl.N = N;
  tl.nvec = (N + V - 1) / V;
  const i64 want = (tl.nvec + R - 1) / R;
  tl.vecs = (tl.nvec + want - 1) / want;
  tl.count = (tl.nvec + tl.vecs - 1) / tl.vecs;
  return tl;
}

// Pack features [f * V, f * V + V) of tile t of an (N, K) matrix with row stride rs into the
// tile buffer P [K][width]: P[k][j] = a[t * width + j][k], zero for rows past N.
void pack_linear(const float* a, i64 rs, i64 K, const Tiles& tl, float* P, i64 t, i64 f) {
  const i64 W = tl.width(), k0 = f * V;
  const int nj = int(K - k0 < V ? K - k0 : V);
  for (i64 c = 0; c < tl.vectors(t); ++c) {
    const i64 n0 = (t * tl.vecs + c) * V;
    const int ni = int(tl.N - n0 < V ? tl.N - n0 : V);
    tile(a + n0 * rs + k0, rs, ni, nj, P + k0 * W + c * V, W, nj, V, nullptr, 0.0f);
  }
}

// pack_linear of features [f * V, f * V + V) of tile t of the output gradient, times the GELU
// derivative the forward kept (gscale, tile t at gscale + t * O * width; NULL: no GELU), so the
// kernels below see the gradient of the pre-activation.
void pack_grad(const float* gy, i64 gs, i64 O, const Tiles& tl, float* P, i64 t, i64 f, const float* gscale) {
  pack_linear(gy, gs, O, tl, P, t, f);
  if (!gscale) return;
  const i64 W = tl.width(), k0 = f * V, k1 = O - k0 < V ? O : k0 + V, nw = tl.vectors(t) * V;
  const float* sc = gscale + t * O * W;
  for (i64 k = k0; k < k1; ++k)
    for (i64 j = 0; j < nw; j += V) st(P + k * W + j, ld(P + k * W + j) * ld(sc + k * W + j));
}

// dst[b * V + 0..V) = sum_k w[k] * src[idx[k] * W + b * V + 0..V) for b < B, in registers
template <int B>
void spmm_row(const float* __restrict src, i64 W, const int32_t* __restrict idx, const float* __restrict w, i64 n,
              float* __restrict dst) {
  vf acc[B];
  unrolled<B>([&](auto b) { acc[b] = vf{}; });
  for (i64 k = 0; k < n; ++k) {
    const float* p = src + i64(idx[k]) * W;
    const vf wk = splat(w[k]);
    unrolled<B>([&](auto b) { acc[b] += wk * ld(p + b * V); });
  }
  unrolled<B>([&](auto b) { st(dst + b * V, acc[b]); });
}

typedef void (*SpmmFn)(const float*, i64, const int32_t*, const float*, i64, float*);
const SpmmFn spmm_fns[8] = {spmm_row<1>, spmm_row<2>, spmm_row<3>, spmm_row<4>,
                            spmm_row<5>, spmm_row<6>, spmm_row<7>, spmm_row<8>};

// Output features [g * V, g * V + V) of tile t: out[n][m] = sum over row m's nonzeros of
// w * P[idx][n] (+ bias[m]), P the packed tile; buf is a per-thread [V][width] scratch. gelu: out
// is gelu of that sum instead, and dkeep (NULL: not kept) receives gelu' of it, feature-major
// ([M][width], the tile's block), the layout in which the backward packs the output gradient.
// res (NULL: none; row stride rs, the layout of out): a residual added to each output (tile()).
void spmm_unit(const float* P, const Tiles& tl, i64 t, const int32_t* ptr, const int32_t* idx, const float* w,
               i64 M, i64 g, const float* bias, float* out, i64 os, float* buf, bool gelu = false,
               float* dkeep = nullptr, const float* res = nullptr, i64 rs = 0) {
  const i64 W = tl.width(), nv = tl.vectors(t), m0 = g * V;
  const int nr = int(M - m0 < V ? M - m0 : V);
  const float* src = P;
  // The unit's output lines are requested for writing before the compute, so their misses overlap
  // it: the output of a training step is fresh memory, and the tile stores below walk it at a row
  // stride no hardware prefetcher follows (in a ViT-preset step: 12-26% less forward-kernel time on
  // one 2-vCPU box, no change measured on a Zen 4 one; docs/benchmarks.md).
  for (i64 c = 0; c < nv; ++c) {
    const i64 n0 = (t * tl.vecs + c) * V;
    const int nd = int(tl.N - n0 < V ? tl.N - n0 : V);
    for (int i = 0; i < nd; ++i) __builtin_prefetch(out + (n0 + i) * os + m0, 1, 3);
  }
  for (int r = 0; r < nr; ++r) {
    const i64 s = ptr[m0 + r], n = ptr[m0 + r + 1] - s;
    if (n == 0)
      zero_positions(buf + r * W, V, nv);
    else
      spmm_fns[nv - 1](src, W, idx + s, w + s, n, buf + r * W);
  }
  if (gelu) {  // on the feature-major scratch: whole vectors, before the transposing store
    for (int r = 0; r < nr; ++r) {
      float* row = buf + r * W;
      float* d = dkeep ? dkeep + (m0 + r) * W : nullptr;
      const vf b = splat(bias ? bias[m0 + r] : 0.0f);
      for (i64 c = 0; c < nv; ++c) {
        vf a, da;
        vgelu(ld(row + c * V) + b, a, da);
        st(row + c * V, a);
        if (d) st(d + c * V, da);
      }
    }
    bias = nullptr;
  }
  for (i64 c = 0; c < nv; ++c) {
    const i64 n0 = (t * tl.vecs + c) * V;
    const int nd = int(tl.N - n0 < V ? tl.N - n0 : V);
    tile(buf + c * V, W, nr, V, out + n0 * os + m0, os, nd, nr, bias ? bias + m0 : nullptr, 0.0f,
         res ? res + n0 * rs + m0 : nullptr, rs);
  }
}

// The lanes' sum in a fixed tree order.
inline float lane_sum(vf a) {
#if defined(__AVX512F__)
  const __m512 z = reinterpret_cast<__m512&>(a);
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 e = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(e, _mm_shuffle_ps(e, e, 1)));
#else
  float t[V];
  std::memcpy(t, &a, sizeof(t));
  for (int h = V / 2; h > 0; h /= 2)
    for (int i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
#endif
}

// For each nonzero k of one row: s = g . x[idx[k]] over B vectors (two chains), added to the
// carried sum acc[k] unless FIRST; stored into acc[k], or lane-summed into gw[k] when LAST.
template <int B, bool FIRST, bool LAST>
void wgrad_row(const float* __restrict g, const float* __restrict x, i64 W, const int32_t* __restrict idx, i64 n,
               float* __restrict acc, float* __restrict gw) {
  vf gr[B];
  unrolled<B>([&](auto b) { gr[b] = ld(g + b * V); });
  for (i64 k = 0; k < n; ++k) {
    const float* p = x + i64(idx[k]) * W;
    vf t0 = FIRST ? vf{} : ld(acc + k * V), t1 = vf{};
    unrolled<B / 2>([&](auto h) {
      t0 += gr[2 * h] * ld(p + 2 * h * V);
      t1 += gr[2 * h + 1] * ld(p + (2 * h + 1) * V);
    });
    if (B % 2) t0 += gr[B - 1] * ld(p + (B - 1) * V);
    t0 += t1;
    if (LAST)
      gw[k] = lane_sum(t0);
    else
      st(acc + k * V, t0);
  }
}

typedef void (*WgradFn)(const float*, const float*, i64, const int32_t*, i64, float*, float*);
#define SPFDE_WG(B) {wgrad_row<B, false, false>, wgrad_row<B, false, true>, wgrad_row<B, true, false>, \
                     wgrad_row<B, true, true>}
const WgradFn wgrad_fns[8][4] = {SPFDE_WG(1), SPFDE_WG(2), SPFDE_WG(3), SPFDE_WG(4),
                                 SPFDE_WG(5), SPFDE_WG(6), SPFDE_WG(7), SPFDE_WG(8)};
#undef SPFDE_WG

// Weight gradient of output rows [r0, r1) for tile t (xb, gb: the packed tiles); acc[k] carries
// nonzero k's vector sum between tiles. After the last tile the sums go into the dense gradient
// gwd at the storage offsets woff (rows [r0, r1) zeroed first when zero_rows: a row-major gwd).
void wgrad_chunk(const float* xb, const float* gb, const Tiles& tl, i64 t, const int32_t* ptr, const int32_t* idx,
                 i64 r0, i64 r1, float* acc, float* sums, float* gwd, const i64* woff, i64 row_len, bool zero_rows) {
  const i64 W = tl.width();
  const bool first = t == 0, last = t == tl.count - 1;
  const WgradFn fn = wgrad_fns[tl.vectors(t) - 1][(first ? 2 : 0) + (last ? 1 : 0)];
  for (i64 o = r0; o < r1; ++o) {
    const i64 s = ptr[o], n = ptr[o + 1] - s;
    if (n) fn(gb + o * W, xb, W, idx + s, n, acc + s * V, sums + s);
  }
  if (!last) return;
  if (zero_rows) std::memset(gwd + r0 * row_len, 0, sizeof(float) * size_t((r1 - r0) * row_len));
  for (i64 k = ptr[r0]; k < ptr[r1]; ++k) gwd[woff[k]] = sums[k];
}

// Bias gradient of output features [o0, o1) for tile t of the packed gy (gpk: [O][width], zero past
// the last row): acc[o] (V lanes, zero before the first tile) adds the tile's vectors; after the
// last tile gb[o] = the lanes' sum (a fixed tree).
void bias_grad_tile(const float* gpk, const Tiles& tl, i64 t, i64 o0, i64 o1, float* acc, float* gb) {
  const i64 W = tl.width(), nv = tl.vectors(t);
  for (i64 o = o0; o < o1; ++o) {
    vf a = ld(acc + o * V);
    for (i64 c = 0; c < nv; ++c) a += ld(gpk + o * W + c * V);
    if (t == tl.count - 1)
      gb[o] = lane_sum(a);
    else
      st(acc + o * V, a);
  }
}

// Weight-gradient chunks of a CSR weight with O rows: consecutive rows, about nnz / (4 threads)
// nonzeros each, at least 256 ({0, cut, ..., O}).
std::vector<i64> row_chunks(const int32_t* rowptr, i64 O, int nthreads) {
  std::vector<i64> cuts{0};
  i64 target = rowptr[O] / (4 * i64(nthreads > 0 ? nthreads : 1));
  target = target < 256 ? 256 : target;
  for (i64 o = 0; o < O; ++o)
    if (rowptr[o + 1] - rowptr[cuts.back()] >= target || o + 1 == O) cuts.push_back(o + 1);
  return cuts;
}

// Rows [0, M) of tile t of a packed output straight into Hp [M][width] (rows innermost, the layout
// pack_linear gives): Hp[m] = sum over row m's nonzeros of w * P[idx]. gelu: gelu(that + bias[m])
// (bias NULL: + 0, as spmm_unit adds), its derivative into Dp [M][width] when Dp is not NULL, and
// the lanes past the last row zeroed, as pack_linear would leave them. scale (not with gelu):
// Hp[m] *= scale[m], the product pack_grad forms. The same sums as spmm_unit's in the same order.
void spmm_packed(const float* P, const Tiles& tl, i64 t, const int32_t* ptr, const int32_t* idx, const float* w, i64 M,
                 const float* bias, bool gelu, float* Hp, float* Dp, const float* scale) {
  const i64 W = tl.width(), nv = tl.vectors(t);
  const i64 last = t * tl.vecs + nv - 1, tail = tl.N - last * V;  // real lanes of the tile's last vector
  for (i64 m = 0; m < M; ++m) {
    float* row = Hp + m * W;
    const i64 s = ptr[m], n = ptr[m + 1] - s;
    if (n == 0)
      zero_positions(row, V, nv);
    else
      spmm_fns[nv - 1](P, W, idx + s, w + s, n, row);
    if (gelu) {
      const vf b = splat(bias ? bias[m] : 0.0f);
      for (i64 c = 0; c < nv; ++c) {
        vf a, da;
        vgelu(ld(row + c * V) + b, a, da);
        st(row + c * V, a);
        if (Dp) st(Dp + m * W + c * V, da);
      }
      for (i64 j = tail; j < V; ++j) row[(nv - 1) * V + j] = 0.0f;
    } else if (scale) {
      for (i64 c = 0; c < nv; ++c) st(row + c * V, ld(row + c * V) * ld(scale + m * W + c * V));
    }
  }
}

// Layer normalisation of one V-vector group of rows (lanes = rows; feature c of the group at p + c * fs,
// c < C), in place, with scale g and shift b (each NULL: 1, 0): a transformer block's pre-norm,
// applied where a fused kernel has just packed its input (ln_tile; per token in spfde_mha_forward). The statistics are
// V-wide over rows, two passes over data in cache; the mean and 1/sqrt(var + eps) of each real row
// (lane < nr) go to mean / rstd at lane * ms for the backward. Lanes past nr stay zero, as the pack
// left them.
void ln_vectors(float* p, i64 C, i64 fs, const float* g, const float* b, float eps, int nr, float* mean, float* rstd,
                i64 ms) {
  const float inv = 1.0f / float(C);
  vf s{};
  for (i64 c = 0; c < C; ++c) s += ld(p + c * fs);
  const vf m = s * inv;
  vf q{};
  for (i64 c = 0; c < C; ++c) {
    const vf d = ld(p + c * fs) - m;
    q += d * d;
  }
  const vf var = q * inv;
  vf r;
  for (int l = 0; l < V; ++l) r[l] = 1.0f / std::sqrt(var[l] + eps);
  for (i64 c = 0; c < C; ++c) {
    vf v = (ld(p + c * fs) - m) * r;
    if (g) v = v * splat(g[c]);
    if (b) v = v + splat(b[c]);
    st(p + c * fs, v);
  }
  if (nr < V)
    for (i64 c = 0; c < C; ++c)
      for (int l = nr; l < V; ++l) p[c * fs + l] = 0.0f;
  for (int l = 0; l < nr; ++l) {
    mean[l * ms] = m[l];
    rstd[l * ms] = r[l];
  }
}

// ln_vectors over the rows of packed tile t (P [I][width], rows innermost; row n's statistics at n)
void ln_tile(float* P, i64 I, const Tiles& tl, i64 t, const float* g, const float* b, float eps, float* mean,
             float* rstd) {
  for (i64 c = 0; c < tl.vectors(t); ++c) {
    const i64 n0 = (t * tl.vecs + c) * V;
    ln_vectors(P + c * V, I, tl.width(), g, b, eps, int(tl.N - n0 < V ? tl.N - n0 : V), mean + n0, rstd + n0, 1);
  }
}

// The layer norm's backward for rows [r0, r1) of the gradient g (row stride gs) at its output, in
// place: g becomes the gradient at its input x (row stride xs), from the forward's mean / rstd and
// scale w (NULL: 1): dx = rstd (g w - mean(g w) - xh mean(g w xh)), xh = (x - mean) rstd. The scale's
// and shift's gradients over these rows are added to pw / pb (I floats each; NULL: not needed), which
// the caller zeroes and sums over its row blocks in a fixed order.
void ln_backward_rows(float* g, i64 gs, const float* x, i64 xs, i64 I, i64 r0, i64 r1, const float* w,
                      const float* mean, const float* rstd, float* pw, float* pb, const float* res = nullptr,
                      i64 rss = 0) {
  const float inv = 1.0f / float(I);
  const i64 Iv = I / V * V;  // whole vectors, then a scalar tail
  for (i64 r = r0; r < r1; ++r) {
    float* gr = g + r * gs;
    const float* xr = x + r * xs;
    const float m = mean[r], rs = rstd[r];
    const vf vm = splat(m), vr = splat(rs);
    vf a1{}, a2{};
    for (i64 k = 0; k < Iv; k += V) {
      const vf xh = (ld(xr + k) - vm) * vr, gk = ld(gr + k), gw = w ? gk * ld(w + k) : gk;
      a1 += gw;
      a2 += gw * xh;
      if (pw) st(pw + k, ld(pw + k) + gk * xh);
      if (pb) st(pb + k, ld(pb + k) + gk);
    }
    float c1 = 0.0f, c2 = 0.0f;
    for (int l = 0; l < V; ++l) {  // lane sums in a fixed order
      c1 += a1[l];
      c2 += a2[l];
    }
    for (i64 k = Iv; k < I; ++k) {
      const float xh = (xr[k] - m) * rs, gw = gr[k] * (w ? w[k] : 1.0f);
      c1 += gw;
      c2 += gw * xh;
      if (pw) pw[k] += gr[k] * xh;
      if (pb) pb[k] += gr[k];
    }
    c1 *= inv;
    c2 *= inv;
    const vf v1 = splat(c1), v2 = splat(c2);
    const float* rr = res ? res + r * rss : nullptr;
    for (i64 k = 0; k < Iv; k += V) {
      const vf xh = (ld(xr + k) - vm) * vr, gk = ld(gr + k), gw = w ? gk * ld(w + k) : gk;
      const vf gi = vr * (gw - v1 - xh * v2);
      st(gr + k, rr ? rounded(gi) + ld(rr + k) : gi);
    }
    for (i64 k = Iv; k < I; ++k) {
      const float xh = (xr[k] - m) * rs, gw = gr[k] * (w ? w[k] : 1.0f), gi = rs * (gw - c1 - xh * c2);
      gr[k] = rr ? rounded(gi) + rr[k] : gi;
    }
  }
}

// The norm's scale and shift gradients (gw, gb; each NULL: not needed) from per-block partial sums
// (parts [blocks][2 I]: the scale's, then the shift's), summed in block order whatever the thread
// count. A work-shared loop: call it from every thread of a parallel region.
void ln_param_grads(const float* parts, i64 blocks, i64 I, float* gw, float* gb) {
#pragma omp for schedule(static) nowait
  for (i64 k = 0; k < 2 * I; ++k) {
    float* out = k < I ? gw : gb;
    if (!out) continue;
    float a = 0.0f;
    for (i64 t = 0; t < blocks; ++t) a += parts[t * 2 * I + k];
    out[k < I ? k : k - I] = a;
  }
}

}  // namespace

extern "C" {

// y (N, O), row stride ys = x (N, I), row stride xs, times W^T + bias (NULL: none), W's nonzeros in
// CSR order: rowptr[O + 1], col, vals. xkeep (NULL: none) receives x's packed tiles, tile t at
// xkeep + t * I * width ([I][width] each; spfde_linear_packed_floats in all), which the backward's
// weight gradient then reads instead of packing x again. gelu: y = gelu(x W^T + bias) (erf form), and
// dkeep (NULL: none; spfde_linear_packed_floats(N, O) floats, tile t at dkeep + t * O * width)
// receives its derivative for the backward's gscale. Returns 0, or 1 when out of memory.
int spfde_linear_forward(const float* x, i64 N, i64 I, i64 xs, i64 O, const int32_t* rowptr, const int32_t* col,
                         const float* vals, const float* bias, float* y, i64 ys, int nthreads, float* xkeep,
                         int gelu, float* dkeep) {
  if (N <= 0) return 0;
  const Tiles tl = make_tiles(N);
  const i64 W = tl.width(), fi = (I + V - 1) / V, fo = (O + V - 1) / V, T = tl.count;
  const bool by_tile = T >= 2 * i64(nthreads > 0 ? nthreads : 1);
  Scratch xp(I * W, xkeep ? 0 : int(by_tile ? nthreads : T), false), buf(V * W, nthreads, false);
  if ((!xkeep && !xp.p) || !buf.p) return 1;
  // tile t's packed rows: in xkeep, else in the scratch slot (the thread's when by_tile, else the tile's)
  auto packed = [&](i64 t, i64 slot) { return xkeep ? xkeep + t * I * W : xp.at(int(slot)); };
  auto dk = [&](i64 t) { return dkeep ? dkeep + t * O * W : nullptr; };
#pragma omp parallel num_threads(nthreads)
  {
    float* b = buf.at(omp_get_thread_num());
    if (by_tile) {  // whole tiles per thread, packed into its own scratch: no barrier
#pragma omp for schedule(dynamic, 1) nowait
      for (i64 t = 0; t < T; ++t) {
        float* P = packed(t, omp_get_thread_num());
        for (i64 f = 0; f < fi; ++f) pack_linear(x, xs, I, tl, P, t, f);
        for (i64 g = 0; g < fo; ++g)
          spmm_unit(P, tl, t, rowptr, col, vals, O, g, bias, y, ys, b, gelu != 0, dk(t));
      }
    } else {
#pragma omp for schedule(static)
      for (i64 u = 0; u < T * fi; ++u) pack_linear(x, xs, I, tl, packed(u / fi, u / fi), u / fi, u % fi);
      // the implicit barrier above: every tile is packed
#pragma omp for schedule(dynamic, 1) nowait
      for (i64 u = 0; u < fo * T; ++u)
        spmm_unit(packed(u % T, u % T), tl, u % T, rowptr, col, vals, O, u / T, bias, y, ys, b, gelu != 0,
                  dk(u % T));
    }
  }
  return 0;
}

// Floats of the forward's xkeep for N rows of I features (every tile).
i64 spfde_linear_packed_floats(i64 N, i64 I) {
  if (N <= 0) return 0;
  const Tiles tl = make_tiles(N);
  return tl.count * I * tl.width();
}

// Gradients of the forward above for the output gradient gy (N, O), row stride gs: gx (N, I), row
// stride gxs (skipped when NULL), and the weight gradient at the nonzeros written into the dense
// gradient gwd (skipped when NULL) at the storage offsets woff[k] of the CSR nonzeros; zero_rows:
// gwd is row-major (O, I) and is zeroed here, else the caller zeroed it; the bias gradient gb (O)
// = column sums of gy (skipped when NULL; only with gx or gwd), summed from the packed tiles in
// tile order. The input gradient reads W^T in CSR order: colptr[I + 1], per entry its row (output
// feature) rowidx and perm, the CSR position of its value. xkept (NULL: none): the forward's xkeep,
// read instead of packing x (x may then be NULL). gscale (NULL: none): the forward's dkeep, a GELU
// forward's derivative: every gradient is then that of the pre-activation, gy * gelu'. Returns 0,
// or 1 when out of memory.
int spfde_linear_backward(const float* x, i64 xs, const float* gy, i64 gs, i64 N, i64 I, i64 O,
                          const int32_t* rowptr, const int32_t* col, const float* vals, const int32_t* colptr,
                          const int32_t* rowidx, const int32_t* perm, float* gx, i64 gxs, float* gwd,
                          const i64* woff, int zero_rows, float* gb, int nthreads, const float* xkept,
                          const float* gscale) {
  const i64 nnz = rowptr[O];
  if (N <= 0) {
    if (gwd && zero_rows) std::memset(gwd, 0, sizeof(float) * size_t(O * I));
    if (gb) std::memset(gb, 0, sizeof(float) * size_t(O));
    return 0;
  }
  const Tiles tl = make_tiles(N);
  const i64 W = tl.width(), fi = (I + V - 1) / V, fo = (O + V - 1) / V;
  const std::vector<i64> cuts = gwd ? row_chunks(rowptr, O, nthreads) : std::vector<i64>{0};
  const i64 chunks = i64(cuts.size()) - 1, T = tl.count;
  // tiles are packed in groups of G (all of them unless that passes 64 MiB of packed rows), so a
  // call has one barrier per group: one for any but very large inputs
  const bool pack_x = gwd && !xkept;
  const i64 cap = (i64(1) << 24) / ((O + (pack_x ? I : 0)) * W);
  const i64 G = nthreads <= 1 ? 1 : (T < cap ? T : (cap > 1 ? cap : 1));
  Scratch gp(O * W, int(G), false), xp(I * W, pack_x ? int(G) : 0, false);
  // tile t's packed x: the forward's, else group slot j
  auto xt = [&](i64 t, i64 j) -> const float* { return xkept ? xkept + t * I * W : xp.at(int(j)); };
  Scratch buf(V * W, gx ? (nthreads > 1 ? nthreads : 1) : 0, false), cw(nnz, gx ? 1 : 0, false),
      acc(T > 1 ? nnz * V : 0, gwd ? 1 : 0, false), sums(nnz, gwd ? 1 : 0, false), bacc(O * V, gb ? 1 : 0, true);
  if (!gp.p || (gwd && ((pack_x && !xp.p) || !acc.p || !sums.p)) || (gx && (!buf.p || !cw.p)) || (gb && !bacc.p)) return 1;
  if (nthreads <= 1) {  // one thread: tile by tile, each used while it is still in cache (same sums)
    if (gx)
      for (i64 j = 0; j < nnz; ++j) cw.p[j] = vals[perm[j]];
    for (i64 t = 0; t < T; ++t) {
      for (i64 f = 0; f < fo; ++f) pack_grad(gy, gs, O, tl, gp.p, t, f, gscale);
      if (pack_x)
        for (i64 f = 0; f < fi; ++f) pack_linear(x, xs, I, tl, xp.p, t, f);
      if (gx)
        for (i64 g = 0; g < fi; ++g) spmm_unit(gp.p, tl, t, colptr, rowidx, cw.p, I, g, nullptr, gx, gxs, buf.p);
      if (gwd)
        for (i64 c = 0; c < chunks; ++c)
          wgrad_chunk(xt(t, 0), gp.p, tl, t, rowptr, col, cuts[c], cuts[c + 1], acc.p, sums.p, gwd, woff, I,
                      zero_rows != 0);
      if (gb) bias_grad_tile(gp.p, tl, t, 0, O, bacc.p, gb);
    }
    return 0;
  }
#pragma omp parallel num_threads(nthreads)
  {
    float* b = gx ? buf.at(omp_get_thread_num()) : nullptr;
    if (gx) {
#pragma omp for schedule(static) nowait
      for (i64 j = 0; j < nnz; ++j) cw.p[j] = vals[perm[j]];
    }
    for (i64 t0 = 0; t0 < T; t0 += G) {
      const i64 n = T - t0 < G ? T - t0 : G;  // tiles t0 .. t0 + n, in buffers 0 .. n
      if (t0 > 0) {  // every thread is done with the previous group's buffers
#pragma omp barrier
      }
#pragma omp for schedule(static) nowait
      for (i64 u = 0; u < n * fo; ++u) pack_grad(gy, gs, O, tl, gp.at(int(u / fo)), t0 + u / fo, u % fo, gscale);
      if (pack_x) {
#pragma omp for schedule(static) nowait
        for (i64 u = 0; u < n * fi; ++u) pack_linear(x, xs, I, tl, xp.at(int(u / fi)), t0 + u / fi, u % fi);
      }
#pragma omp barrier
      if (gx && n >= 2 * i64(nthreads)) {  // whole tiles per thread
#pragma omp for schedule(dynamic, 1) nowait
        for (i64 j = 0; j < n; ++j)
          for (i64 g = 0; g < fi; ++g)
            spmm_unit(gp.at(int(j)), tl, t0 + j, colptr, rowidx, cw.p, I, g, nullptr, gx, gxs, b);
      } else if (gx) {
#pragma omp for schedule(dynamic, 1) nowait
        for (i64 u = 0; u < fi * n; ++u)
          spmm_unit(gp.at(int(u % n)), tl, t0 + u % n, colptr, rowidx, cw.p, I, u / n, nullptr, gx, gxs, b);
      }
      if (gwd) {
#pragma omp for schedule(dynamic, 1) nowait
        for (i64 c = 0; c < chunks; ++c)
          for (i64 j = 0; j < n; ++j)
            wgrad_chunk(xt(t0 + j, j), gp.at(int(j)), tl, t0 + j, rowptr, col, cuts[c], cuts[c + 1], acc.p, sums.p,
                        gwd, woff, I, zero_rows != 0);
      }
      if (gb) {  // output features in groups of V, each summed over this group's tiles in order
#pragma omp for schedule(static) nowait
        for (i64 g = 0; g < fo; ++g)
          for (i64 j = 0; j < n; ++j)
            bias_grad_tile(gp.at(int(j)), tl, t0 + j, g * V, g * V + V < O ? g * V + V : O, bacc.p, gb);
      }
    }
  }
  return 0;
}

}  // extern "C"

// =============================================================================================
// Sparse MLP: y = fc2(gelu(fc1(x))), a transformer block's MLP, both weights sparse, in one call.
//
// Layout: the Linear's tiles. Each tile of x is packed once; fc1's outputs for the tile go
// straight into a packed [hidden][width] tile (spmm_packed: rows innermost, the layout fc2 reads),
// are GELU'd there with the derivative kept, and fc2's outputs are transposed into y. So the
// hidden activation is never written row-major nor packed again: of the four transposes of fc1
// and fc2 called one after the other (fc1's output, fc2's input; in the backward fc2's input
// gradient, fc1's output gradient) none is left, and the whole forward of a tile runs on one
// thread from cache, with no barrier. The backward packs the tiles of gy, forms fc2's input
// gradient as fc1's packed output gradient (times the kept GELU derivative), and transposes only
// fc1's input gradient out (then one barrier before the weight and bias gradients, which walk
// every tile). Every sum is the one spfde_linear_forward / _backward computes on the same tiles,
// in the same order, so the results are bit-identical to the two Linear calls (fc1 with its
// fused GELU) for any thread count.

extern "C" {

// y (N, O), row stride ys = fc2(gelu(fc1(x))) for x (N, I), row stride xs; fc1 (Hd, I) and fc2
// (O, Hd) in CSR order (rowptr, col; bias NULL: none), their values read from the dense weights w1 /
// w2 at the nonzeros' storage offsets woff1 / woff2 (gather_values). xkeep: x's packed tiles (for fc1's
// weight gradient; spfde_linear_packed_floats(N, I)), hkeep: the packed hidden activation (fc2's
// weight gradient; (N, Hd)), dkeep: the GELU's derivative (any gradient through fc1; (N, Hd));
// each NULL: not kept. ln: fc1's input is the layer norm of x (ln_tile: scale lnw, shift lnb, each
// NULL: none; eps), whose per-row mean and rstd (N floats each) are written for the backward, and
// xkeep holds the normalised rows. res: y is x + that (a pre-norm block's residual; O == I: each
// output row gets x's row added as it is written, tile()). Returns 0, or 1 when out of memory.
int spfde_mlp_forward(const float* x, i64 N, i64 I, i64 xs, i64 Hd, i64 O, const int32_t* p1, const int32_t* c1,
                      const float* w1, const i64* woff1, const float* b1, const int32_t* p2, const int32_t* c2,
                      const float* w2, const i64* woff2, const float* b2, float* y, i64 ys, int nthreads,
                      float* xkeep, float* hkeep, float* dkeep, int ln, const float* lnw, const float* lnb, float eps,
                      float* mean, float* rstd, int res) {
  if (N <= 0) return 0;
  const Tiles tl = make_tiles(N);
  const i64 W = tl.width(), fi = (I + V - 1) / V, fo = (O + V - 1) / V, T = tl.count;
  const int nt = nthreads > 0 ? nthreads : 1;
  Scratch xp(I * W, xkeep ? 0 : nt, false), hp(Hd * W, hkeep ? 0 : nt, false), buf(V * W, nt, false),
      g1(p1[Hd], 1, false), g2(p2[O], 1, false);
  if ((!xkeep && !xp.p) || (!hkeep && !hp.p) || !buf.p || !g1.p || !g2.p) return 1;
  const float *v1 = g1.p, *v2 = g2.p;
#pragma omp parallel num_threads(nthreads)
  {
    const int me = omp_get_thread_num();
    float* b = buf.at(me);
    gather_values(w1, woff1, p1[Hd], g1.p, w2, woff2, p2[O], g2.p);
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < T; ++t) {
      float* P = xkeep ? xkeep + t * I * W : xp.at(me);
      float* Hp = hkeep ? hkeep + t * Hd * W : hp.at(me);
      for (i64 f = 0; f < fi; ++f) pack_linear(x, xs, I, tl, P, t, f);
      if (ln) ln_tile(P, I, tl, t, lnw, lnb, eps, mean, rstd);
      spmm_packed(P, tl, t, p1, c1, v1, Hd, b1, true, Hp, dkeep ? dkeep + t * Hd * W : nullptr, nullptr);
      for (i64 g = 0; g < fo; ++g)
        spmm_unit(Hp, tl, t, p2, c2, v2, O, g, b2, y, ys, b, false, nullptr, res ? x : nullptr, xs);
    }
  }
  return 0;
}

// Gradients of the forward above for gy (N, O), row stride gs, from its xkeep / hkeep / dkeep: gx
// (N, I), row stride gxs; the weight gradients at the nonzeros written into the dense gradients gw1
// (Hd, I) and gw2 (O, Hd) at the storage offsets woff1 / woff2 (zero1 / zero2: row-major, zeroed
// here, else the caller zeroed them); the bias gradients gb1 (Hd), gb2 (O). Each output NULL:
// skipped. fc1 / fc2 as in the forward plus their transposed structure (colptr, rowidx, perm: as
// spfde_linear_backward reads it). gx, gw1 and gb1 need dkeep, gw1 xkeep, gw2 hkeep. ln (the forward
// normalised x): gx is the gradient at x through the norm (ln_backward_rows, each tile's rows once
// they are written: x (row stride xs), its scale lnw (NULL: none), the forward's mean / rstd), and
// glnw / glnb (NULL: not needed; they need gx) receive the scale's and shift's gradients, summed
// over the tiles in order. res (the forward's residual): gy is added to each finished row of gx
// (after the norm's backward): the gradient at x of x + the MLP. Returns 0, or 1 when out of memory.
int spfde_mlp_backward(const float* gy, i64 gs, i64 N, i64 I, i64 Hd, i64 O, const int32_t* p1, const int32_t* c1,
                       const float* w1, const int32_t* tp1, const int32_t* tc1, const int32_t* perm1, const i64* woff1,
                       const int32_t* p2, const int32_t* c2, const float* w2, const int32_t* tp2, const int32_t* tc2,
                       const int32_t* perm2, const i64* woff2, const float* xkeep, const float* hkeep,
                       const float* dkeep, float* gx, i64 gxs, float* gw1, int zero1, float* gb1, float* gw2, int zero2,
                       float* gb2, int nthreads, int ln, const float* x, i64 xs, const float* lnw, const float* mean,
                       const float* rstd, float* glnw, float* glnb, int res) {
  const i64 nnz1 = p1[Hd], nnz2 = p2[O];
  if (N <= 0) {
    if (gw1 && zero1) std::memset(gw1, 0, sizeof(float) * size_t(Hd * I));
    if (gw2 && zero2) std::memset(gw2, 0, sizeof(float) * size_t(O * Hd));
    if (gb1) std::memset(gb1, 0, sizeof(float) * size_t(Hd));
    if (gb2) std::memset(gb2, 0, sizeof(float) * size_t(O));
    if (glnw) std::memset(glnw, 0, sizeof(float) * size_t(I));
    if (glnb) std::memset(glnb, 0, sizeof(float) * size_t(I));
    return 0;
  }
  const Tiles tl = make_tiles(N);
  const i64 W = tl.width(), fi = (I + V - 1) / V, fo = (O + V - 1) / V, fh = (Hd + V - 1) / V, T = tl.count;
  const int nt = nthreads > 0 ? nthreads : 1;
  const bool gh = gx || gw1 || gb1;  // fc1's output gradient is needed
  const std::vector<i64> cuts1 = gw1 ? row_chunks(p1, Hd, nthreads) : std::vector<i64>{0};
  const std::vector<i64> cuts2 = gw2 ? row_chunks(p2, O, nthreads) : std::vector<i64>{0};
  const i64 ch1 = i64(cuts1.size()) - 1, ch2 = i64(cuts2.size()) - 1;
  Scratch gp(T * O * W, 1, false), ghp(T * Hd * W, gh ? 1 : 0, false), buf(V * W, gx ? nt : 0, false),
      cw1(nnz1, gx ? 1 : 0, false), cw2(nnz2, gh ? 1 : 0, false), acc1(T > 1 ? nnz1 * V : 0, gw1 ? 1 : 0, false),
      acc2(T > 1 ? nnz2 * V : 0, gw2 ? 1 : 0, false), sums1(nnz1, gw1 ? 1 : 0, false),
      sums2(nnz2, gw2 ? 1 : 0, false), bacc1(Hd * V, gb1 ? 1 : 0, true), bacc2(O * V, gb2 ? 1 : 0, true),
      lnp(T * 2 * I, ln && gx && (glnw || glnb) ? 1 : 0, false);  // per tile: the norm's scale, shift sums
  if (!gp.p || (gh && (!ghp.p || !cw2.p)) || (gx && (!buf.p || !cw1.p)) || (gw1 && (!acc1.p || !sums1.p)) ||
      (gw2 && (!acc2.p || !sums2.p)) || (gb1 && !bacc1.p) || (gb2 && !bacc2.p) || (ln && gx && (glnw || glnb) && !lnp.p))
    return 1;
  auto G = [&](i64 t) { return gp.p + t * O * W; };
  auto GH = [&](i64 t) { return ghp.p + t * Hd * W; };
#pragma omp parallel num_threads(nthreads)
  {
    float* b = gx ? buf.at(omp_get_thread_num()) : nullptr;
    if (gx) {
#pragma omp for schedule(static) nowait
      for (i64 j = 0; j < nnz1; ++j) cw1.p[j] = w1[woff1[perm1[j]]];
    }
    if (gh) {
#pragma omp for schedule(static)
      for (i64 j = 0; j < nnz2; ++j) cw2.p[j] = w2[woff2[perm2[j]]];
    }
#pragma omp for schedule(dynamic, 1)
    for (i64 t = 0; t < T; ++t) {
      for (i64 f = 0; f < fo; ++f) pack_grad(gy, gs, O, tl, G(t), t, f, nullptr);
      if (!gh) continue;
      spmm_packed(G(t), tl, t, tp2, tc2, cw2.p, Hd, nullptr, false, GH(t), nullptr, dkeep + t * Hd * W);
      if (gx) {
        const float* rg = res && !ln ? gy : nullptr;  // with the norm: added after its backward
        for (i64 g = 0; g < fi; ++g)
          spmm_unit(GH(t), tl, t, tp1, tc1, cw1.p, I, g, nullptr, gx, gxs, b, false, nullptr, rg, gs);
        if (ln) {  // the tile's rows of gx are complete: through the norm
          const i64 r0 = t * tl.width(), r1 = r0 + tl.width() < N ? r0 + tl.width() : N;
          float* part = lnp.p ? lnp.p + t * 2 * I : nullptr;
          if (part) std::memset(part, 0, sizeof(float) * size_t(2 * I));
          ln_backward_rows(gx, gxs, x, xs, I, r0, r1, lnw, mean, rstd, glnw ? part : nullptr,
                           glnb ? part + I : nullptr, res ? gy : nullptr, gs);
        }
      }
    }
    // the implicit barrier above: every tile's gradients are packed
#pragma omp for schedule(dynamic, 1) nowait
    for (i64 c = 0; c < ch1 + ch2; ++c)
      for (i64 t = 0; t < T; ++t) {
        if (c < ch1)
          wgrad_chunk(xkeep + t * I * W, GH(t), tl, t, p1, c1, cuts1[c], cuts1[c + 1], acc1.p, sums1.p, gw1, woff1, I,
                      zero1 != 0);
        else
          wgrad_chunk(hkeep + t * Hd * W, G(t), tl, t, p2, c2, cuts2[c - ch1], cuts2[c - ch1 + 1], acc2.p, sums2.p,
                      gw2, woff2, Hd, zero2 != 0);
      }
#pragma omp for schedule(static) nowait
    for (i64 g = 0; g < (gb1 ? fh : 0) + (gb2 ? fo : 0); ++g) {
      const bool first = gb1 && g < fh;  // fc1's bias groups, then fc2's
      const i64 gg = first ? g : g - (gb1 ? fh : 0), M = first ? Hd : O;
      for (i64 t = 0; t < T; ++t)
        bias_grad_tile(first ? GH(t) : G(t), tl, t, gg * V, gg * V + V < M ? gg * V + V : M, first ? bacc1.p : bacc2.p,
                       first ? gb1 : gb2);
    }
    if (ln && gx && (glnw || glnb)) ln_param_grads(lnp.p, T, I, glnw, glnb);
  }
  return 0;
}

}  // extern "C"

// =============================================================================================
// Short-sequence multi-head self-attention core (nn.MultiheadAttention under spfde's attention
// path, attention.py): o = softmax(q k^T * scale) v per sample and head, from the packed
// projection qkv (B, L, [q | k | v] of E = H * D columns each) into o (B, L, E, heads side by
// side), and its gradient into a packed dqkv. Why: at ViT-preset sizes (17 tokens, 16 features
// per head) PyTorch's bmm/softmax/bmm spends its time on 512 tiny matrices per call.
//
// Layout. Samples innermost, as in the kernels above: a unit is (block of V samples, head); its q,
// k, v (and, backward, the output gradient) are transposed into [L][D][V] scratch (zero lanes past
// the batch's end), so every multiply-add, the softmax's max, exp and sum included, is a V-wide
// operation on V samples at once, with no horizontal reduction and no padding of the sequence.
// The probabilities are kept ([unit][L][L][V]) for the backward pass, which recomputes nothing:
//   dv = p^T do;  dp = do v^T;  ds = p * (dp - rowsum(p * dp)) * scale;  dq = ds k;  dk = ds^T q.
// Each unit is owned by one thread and every sum runs in a fixed order (keys, then features),
// so results are bit-identical for any thread count. exp is vexp_neg (at the top of the file).

namespace {

// out[j] = scale * sum_d a[d] * b[j][d] for j < L (a: [D][V], b: [L][D][V]), four keys at a time
inline void att_scores(const float* a, const float* b, i64 L, i64 D, float scale, float* out) {
  i64 j = 0;
  for (; j + 4 <= L; j += 4) {
    vf s0{}, s1{}, s2{}, s3{};
    const float *b0 = b + j * D * V, *b1 = b0 + D * V, *b2 = b1 + D * V, *b3 = b2 + D * V;
    for (i64 d = 0; d < D; ++d) {
      const vf x = ld(a + d * V);
      s0 += x * ld(b0 + d * V);
      s1 += x * ld(b1 + d * V);
      s2 += x * ld(b2 + d * V);
      s3 += x * ld(b3 + d * V);
    }
    st(out + j * V, s0 * scale);
    st(out + (j + 1) * V, s1 * scale);
    st(out + (j + 2) * V, s2 * scale);
    st(out + (j + 3) * V, s3 * scale);
  }
  for (; j < L; ++j) {
    vf s{};
    for (i64 d = 0; d < D; ++d) s += ld(a + d * V) * ld(b + (j * D + d) * V);
    st(out + j * V, s * scale);
  }
}

// out[d] = sum_j w[j * ws] * m[j][d] for d < D (w: V-vectors at stride ws, m: [L][D][V]), four
// features at a time; the sum runs over j in order
inline void att_mix(const float* w, i64 ws, const float* m, i64 L, i64 D, float* out) {
  i64 d = 0;
  for (; d + 4 <= D; d += 4) {
    vf a0{}, a1{}, a2{}, a3{};
    for (i64 j = 0; j < L; ++j) {
      const vf p = ld(w + j * ws);
      const float* r = m + (j * D + d) * V;
      a0 += p * ld(r);
      a1 += p * ld(r + V);
      a2 += p * ld(r + 2 * V);
      a3 += p * ld(r + 3 * V);
    }
    st(out + d * V, a0);
    st(out + (d + 1) * V, a1);
    st(out + (d + 2) * V, a2);
    st(out + (d + 3) * V, a3);
  }
  for (; d < D; ++d) {
    vf a{};
    for (i64 j = 0; j < L; ++j) a += ld(w + j * ws) * ld(m + (j * D + d) * V);
    st(out + d * V, a);
  }
}

// [L][D][V] scratch (lane = sample) <-> columns [c0, c0 + D) of a (sample, token, column) array
// with sample stride sb, token stride sl and unit column stride; lanes past nv read as zero
void att_pack(const float* src, i64 sb, i64 sl, i64 L, i64 D, i64 c0, int nv, float* dst) {
  for (i64 i = 0; i < L; ++i)
    for (i64 d = 0; d < D; d += V) {
      const int nd = int(D - d < V ? D - d : V);
      tile(src + i * sl + c0 + d, sb, nv, nd, dst + (i * D + d) * V, V, nd, V, nullptr, 0.0f);
    }
}

// Unit u = (sample block u / H, head u % H): its q, k and v ([L][D][V] each) from the packed
// projection; returns how many of its V lanes are real samples.
int att_load_unit(const float* qkv, i64 B, i64 H, i64 qb, i64 ql, i64 L, i64 D, i64 E, i64 u, float* q, float* k,
                  float* v) {
  const i64 nb = u / H, h = u % H;
  const int nv = int(B - nb * V < V ? B - nb * V : V);
  const float* base = qkv + nb * V * qb;
  att_pack(base, qb, ql, L, D, h * D, nv, q);
  att_pack(base, qb, ql, L, D, E + h * D, nv, k);
  att_pack(base, qb, ql, L, D, 2 * E + h * D, nv, v);
  return nv;
}

void att_unpack(const float* src, i64 L, i64 D, float* dst, i64 sb, i64 sl, i64 c0, int nv) {
  for (i64 i = 0; i < L; ++i)
    for (i64 d = 0; d < D; d += V) {
      const int nd = int(D - d < V ? D - d : V);
      tile(src + (i * D + d) * V, V, nd, nv, dst + i * sl + c0 + d, sb, nv, nd, nullptr, 0.0f);
    }
}

// Request for writing the lines att_unpack will write (columns [c0, c0 + D) of nv samples), so
// their misses overlap the unit's compute (as spmm_unit does for the Linear's output).
void att_prefetch_out(float* dst, i64 sb, i64 sl, i64 L, i64 D, i64 c0, int nv) {
  for (int s = 0; s < nv; ++s)
    for (i64 i = 0; i < L; ++i)
      for (i64 d = 0; d < D; d += V) __builtin_prefetch(dst + s * sb + i * sl + c0 + d, 1, 3);
}

// One (16 samples, head) unit of the forward: ob [L][D][V] = softmax(q k^T * scale) v for q, k, v
// [L][D][V]; pu [L][L][V] receives the probabilities (kept for the backward, or scratch).
void att_forward_unit(const float* q, const float* k, const float* v, i64 L, i64 D, float scale, float* pu,
                      float* ob) {
  for (i64 i = 0; i < L; ++i) {
    float* p = pu + i * L * V;
    att_scores(q + i * D * V, k, L, D, scale, p);
    vf m = ld(p);
    for (i64 j = 1; j < L; ++j) {
      const vf s = ld(p + j * V);
      m = s > m ? s : m;
    }
    vf sum{};
    for (i64 j = 0; j < L; ++j) {
      const vf e = vexp_neg(ld(p + j * V) - m);
      st(p + j * V, e);
      sum += e;
    }
    const vf inv = 1.0f / sum;
    for (i64 j = 0; j < L; ++j) st(p + j * V, ld(p + j * V) * inv);
    att_mix(p, V, v, L, D, ob + i * D * V);
  }
}

// One unit of the backward: dq, dk, dv [L][D][V] from q, k, v, the output gradient g [L][D][V]
// and the forward's probabilities pu; ds [L][L][V] is scratch.
void att_backward_unit(const float* q, const float* k, const float* v, const float* g, const float* pu, i64 L,
                       i64 D, float scale, float* dq, float* dk, float* dv, float* ds) {
  for (i64 j = 0; j < L; ++j) att_mix(pu + j * V, L * V, g, L, D, dv + j * D * V);  // dv = p^T do
  for (i64 i = 0; i < L; ++i) {
    const float* p = pu + i * L * V;
    float* s = ds + i * L * V;
    att_scores(g + i * D * V, v, L, D, 1.0f, s);  // dp = do v^T
    vf delta{};
    for (i64 j = 0; j < L; ++j) delta += ld(p + j * V) * ld(s + j * V);
    for (i64 j = 0; j < L; ++j) st(s + j * V, ld(p + j * V) * (ld(s + j * V) - delta) * scale);
    att_mix(s, V, k, L, D, dq + i * D * V);  // dq = ds k
  }
  for (i64 j = 0; j < L; ++j) att_mix(ds + j * V, L * V, q, L, D, dk + j * D * V);  // dk = ds^T q
}

}  // namespace

extern "C" {

// o (B, L, E) = attention of qkv (B, L, 3 * E: q, k, v of H heads of E / H features each), both
// with unit column stride, sample strides qb / sob and token strides ql / ol; P: the probabilities
// [ceil(B / V) * H][L][L][V] kept for the backward pass (NULL: not kept). Returns 0, or 1 when out
// of memory.
int spfde_attention_forward(const float* qkv, i64 B, i64 L, i64 E, i64 H, i64 qb, i64 ql, float scale, float* o,
                            i64 sob, i64 ol, float* P, int nthreads) {
  if (B <= 0 || L <= 0) return 0;
  const i64 D = E / H, NB = (B + V - 1) / V, LDV = L * D * V;
  Scratch qkvb(4 * LDV, nthreads, false), pb(L * L * V, P ? 0 : nthreads, false);  // P not kept: per-thread rows
  if (!qkvb.p || (!P && !pb.p)) return 1;
#pragma omp parallel num_threads(nthreads)
  {
    float* q = qkvb.at(omp_get_thread_num());
    float *k = q + LDV, *v = k + LDV, *ob = v + LDV;
    float* own = P ? nullptr : pb.at(omp_get_thread_num());
#pragma omp for schedule(static)
    for (i64 u = 0; u < NB * H; ++u) {
      const i64 nb = u / H, h = u % H;
      const int nv = att_load_unit(qkv, B, H, qb, ql, L, D, E, u, q, k, v);
      att_prefetch_out(o + nb * V * sob, sob, ol, L, D, h * D, nv);
      att_forward_unit(q, k, v, L, D, scale, P ? P + u * L * L * V : own, ob);
      att_unpack(ob, L, D, o + nb * V * sob, sob, ol, h * D, nv);
    }
  }
  return 0;
}

// Gradient of the forward above for the output gradient go (B, L, E; sample and token strides gb,
// gl) and its kept P, into dqkv (B, L, 3 * E; strides db, dl; every element written). Returns 0,
// or 1 when out of memory.
int spfde_attention_backward(const float* qkv, i64 B, i64 L, i64 E, i64 H, i64 qb, i64 ql, float scale,
                             const float* go, i64 gb, i64 gl, const float* P, float* dqkv, i64 db, i64 dl,
                             int nthreads) {
  if (B <= 0 || L <= 0) return 0;
  const i64 D = E / H, NB = (B + V - 1) / V, LDV = L * D * V;
  Scratch buf(7 * LDV + L * L * V, nthreads, false);
  if (!buf.p) return 1;
#pragma omp parallel num_threads(nthreads)
  {
    float* q = buf.at(omp_get_thread_num());
    float *k = q + LDV, *v = k + LDV, *g = v + LDV, *dq = g + LDV, *dk = dq + LDV, *dv = dk + LDV;
    float* ds = dv + LDV;
#pragma omp for schedule(static)
    for (i64 u = 0; u < NB * H; ++u) {
      const i64 nb = u / H, h = u % H;
      const int nv = att_load_unit(qkv, B, H, qb, ql, L, D, E, u, q, k, v);
      att_pack(go + nb * V * gb, gb, gl, L, D, h * D, nv, g);
      for (i64 part = 0; part < 3; ++part) att_prefetch_out(dqkv + nb * V * db, db, dl, L, D, part * E + h * D, nv);
      att_backward_unit(q, k, v, g, P + u * L * L * V, L, D, scale, dq, dk, dv, ds);
      float* out = dqkv + nb * V * db;
      att_unpack(dq, L, D, out, db, dl, h * D, nv);
      att_unpack(dk, L, D, out, db, dl, E + h * D, nv);
      att_unpack(dv, L, D, out, db, dl, 2 * E + h * D, nv);
    }
  }
  return 0;
}

}  // extern "C"

// =============================================================================================
// Fused self-attention block: y = out_proj(attention(in_proj(x))) of nn.MultiheadAttention, both
// projections sparse, the short-attention core in between, in one call.
//
// Layout: units of 16 samples (the core's unit), each activation of a unit stored [feature][token]
// [16 samples] ("unit layout", L vectors per feature row). A unit's x is packed once (16 x 16
// register transposes); in_proj writes q, k and v straight in unit layout (a row's nonzeros stream
// the packed x, L vectors at a time in pieces of at most 8), the core reads each head from there
// (vector copies into its [token][feature][16] scratch, no transposes), out_proj reads the core's
// output in unit layout, and only y is transposed out. So of the eight transposes of the three
// calls one after the other (in_proj's output, the core's q/k/v and o, out_proj's input; and their
// mirrors in the backward) none is left, a unit's forward runs on one thread from cache with no
// barrier, and the block is one call instead of three. The backward packs gy per unit, forms
// out_proj's input gradient, runs the core's backward and in_proj's input gradient in unit layout
// and transposes only gx out; after one barrier both weight gradients and both bias gradients
// are summed from the kept unit buffers, unit by unit in order.
// Outputs and the input gradient are the three calls' bit for bit (every element is the same sum
// in the same order); the weight and bias gradients sum the same products over the rows in
// another order (units, not 128-row tiles), so they agree within float rounding. Every sum runs in
// an order fixed by the shapes and the masks: bit-identical for any thread count.

namespace {

// Unit nb's rows of a (B, L, C) activation (sample stride sb, token stride sl, unit column stride)
// into U [C][L][V]; lanes past nv read as zero.
void unit_pack(const float* a, i64 sb, i64 sl, i64 L, i64 C, int nv, float* U) {
  for (i64 l = 0; l < L; ++l)
    for (i64 c = 0; c < C; c += V) {
      const int nd = int(C - c < V ? C - c : V);
      tile(a + l * sl + c, sb, nv, nd, U + (c * L + l) * V, L * V, nd, V, nullptr, 0.0f);
    }
}

// U [C][L][V] back into a unit's rows of a (B, L, C) activation, + bias[c] when bias is not NULL,
// then + the unit's rows of res (strides rb, rl; NULL: none), a residual.
void unit_unpack(const float* U, i64 L, i64 C, float* a, i64 sb, i64 sl, int nv, const float* bias,
                 const float* res = nullptr, i64 rb = 0, i64 rl = 0) {
  for (i64 l = 0; l < L; ++l)
    for (i64 c = 0; c < C; c += V) {
      const int nd = int(C - c < V ? C - c : V);
      tile(U + (c * L + l) * V, L * V, nd, nv, a + l * sl + c, sb, nv, nd, bias ? bias + c : nullptr, 0.0f,
           res ? res + l * rl + c : nullptr, rb);
    }
}

// out [M][L][V] = sum over row m's nonzeros of w * U[idx] (U [.][L][V]), + bias[m] when bias is not
// NULL; lanes past nv zeroed (when nv < V), as a pack from rows would leave them.
void unit_spmm(const float* U, i64 L, const int32_t* ptr, const int32_t* idx, const float* w, i64 M,
               const float* bias, int nv, float* out) {
  const i64 W = L * V;
  for (i64 m = 0; m < M; ++m) {
    const i64 s = ptr[m], n = ptr[m + 1] - s;
    float* row = out + m * W;
    for (i64 p = 0; p < L; p += 8) {
      const i64 b = L - p < 8 ? L - p : 8;
      if (n == 0)
        zero_positions(row + p * V, V, b);
      else
        spmm_fns[b - 1](U + p * V, W, idx + s, w + s, n, row + p * V);
    }
    if (bias) {
      const vf bb = splat(bias[m]);
      for (i64 l = 0; l < L; ++l) st(row + l * V, ld(row + l * V) + bb);
    }
    if (nv < V)
      for (i64 l = 0; l < L; ++l)
        for (int j = nv; j < V; ++j) row[l * V + j] = 0.0f;
  }
}

// Head h of a unit-layout [F][L][V] buffer (feature offset c0) <-> the core's [L][D][V] scratch.
void head_in(const float* U, i64 L, i64 D, i64 c0, float* t) {
  for (i64 i = 0; i < L; ++i)
    for (i64 d = 0; d < D; ++d) st(t + (i * D + d) * V, ld(U + ((c0 + d) * L + i) * V));
}
void head_out(const float* t, i64 L, i64 D, i64 c0, float* U) {
  for (i64 i = 0; i < L; ++i)
    for (i64 d = 0; d < D; ++d) st(U + ((c0 + d) * L + i) * V, ld(t + (i * D + d) * V));
}

// Weight gradient of rows [r0, r1) for piece (u, p) of the unit-layout buffers (x [NB][I][L][V], g
// [NB][O][L][V]): acc[k] carries nonzero k's vector sum over the pieces, units in order, each
// unit's L vectors in pieces of at most 8; after the last piece the sums go into the dense
// gradient at woff (rows [r0, r1) zeroed first when zero_rows).
void unit_wgrad(const float* x, i64 I, const float* g, i64 O, i64 NB, i64 L, i64 u, i64 p, const int32_t* ptr,
                const int32_t* idx, i64 r0, i64 r1, float* acc, float* sums, float* gwd, const i64* woff, bool zero_rows) {
  const i64 W = L * V, pieces = (L + 7) / 8, p0 = p * 8, b = L - p0 < 8 ? L - p0 : 8;
  const bool first = u == 0 && p == 0, last = u == NB - 1 && p == pieces - 1;
  const WgradFn fn = wgrad_fns[b - 1][(first ? 2 : 0) + (last ? 1 : 0)];
  for (i64 o = r0; o < r1; ++o) {
    const i64 s = ptr[o], n = ptr[o + 1] - s;
    if (n) fn(g + (u * O + o) * W + p0 * V, x + u * I * W + p0 * V, W, idx + s, n, acc + s * V, sums + s);
  }
  if (!last) return;
  if (zero_rows) std::memset(gwd + r0 * I, 0, sizeof(float) * size_t((r1 - r0) * I));
  for (i64 k = ptr[r0]; k < ptr[r1]; ++k) gwd[woff[k]] = sums[k];
}

// gb[o] for o in [o0, o1): the lanes' sum (fixed tree) of row o's vectors over every unit in order.
void unit_bias_grad(const float* g, i64 O, i64 NB, i64 L, i64 o0, i64 o1, float* gb) {
  const i64 W = L * V;
  for (i64 o = o0; o < o1; ++o) {
    vf a{};
    for (i64 u = 0; u < NB; ++u)
      for (i64 l = 0; l < L; ++l) a += ld(g + (u * O + o) * W + l * V);
    gb[o] = lane_sum(a);
  }
}

}  // namespace

extern "C" {

// Floats of one unit-layout buffer of C features for B samples of L tokens (every unit).
i64 spfde_mha_unit_floats(i64 B, i64 L, i64 C) { return (B + V - 1) / V * C * L * V; }

// y (B, L, E; sample / token strides yb, yl) = out_proj(attention(in_proj(x))) for x (B, L, E;
// strides xb, xl; unit column strides), H heads, scale 1/sqrt(E/H); in_proj (3E, E) and out_proj (E, E)
// in CSR order (bias NULL: none), values from the dense weights w1 / w2 at woff1 / woff2 as in
// spfde_mlp_forward. Kept for the backward (NULL: not kept): xkeep (unit-layout x, for
// in_proj's weight gradient), qkvkeep (unit-layout q/k/v) and P (the probabilities, as
// spfde_attention_forward keeps them) for any gradient through the core, okeep (the core's output,
// for out_proj's weight gradient). ln: in_proj's input is the layer norm of x over its E features
// (ln_vectors per token of each unit: scale lnw, shift lnb, each NULL: none; eps), whose mean and
// rstd of sample b, token l go to mean / rstd at b * L + l, and xkeep holds the normalised x.
// res: y is x + that (a pre-norm block's residual). Returns 0, or 1 when out of memory.
int spfde_mha_forward(const float* x, i64 B, i64 L, i64 E, i64 H, i64 xb, i64 xl, float scale, const int32_t* p1,
                      const int32_t* c1, const float* w1, const i64* woff1, const float* b1, const int32_t* p2,
                      const int32_t* c2, const float* w2, const i64* woff2, const float* b2, float* y, i64 yb, i64 yl,
                      int nthreads, float* xkeep,
                      float* qkvkeep, float* P, float* okeep, int ln, const float* lnw, const float* lnb, float eps,
                      float* mean, float* rstd, int res) {
  if (B <= 0 || L <= 0) return 0;
  const i64 D = E / H, NB = (B + V - 1) / V, LV = L * V, LDV = L * D * V;
  const int nt = nthreads > 0 ? nthreads : 1;
  Scratch xs(E * LV, xkeep ? 0 : nt, false), qs(3 * E * LV, qkvkeep ? 0 : nt, false), os(E * LV, okeep ? 0 : nt, false),
      ys(E * LV, nt, false), hs(4 * LDV, nt, false), pb(L * L * V, P ? 0 : nt, false), g1(p1[3 * E], 1, false),
      g2(p2[E], 1, false);
  if ((!xkeep && !xs.p) || (!qkvkeep && !qs.p) || (!okeep && !os.p) || !ys.p || !hs.p || (!P && !pb.p) || !g1.p ||
      !g2.p)
    return 1;
  const float *v1 = g1.p, *v2 = g2.p;
#pragma omp parallel num_threads(nthreads)
  {
    const int me = omp_get_thread_num();
    gather_values(w1, woff1, p1[3 * E], g1.p, w2, woff2, p2[E], g2.p);
    float* q = hs.at(me);
    float *k = q + LDV, *v = k + LDV, *ob = v + LDV;
#pragma omp for schedule(dynamic, 1)
    for (i64 nb = 0; nb < NB; ++nb) {
      const int nv = int(B - nb * V < V ? B - nb * V : V);
      float* X = xkeep ? xkeep + nb * E * LV : xs.at(me);
      float* Q = qkvkeep ? qkvkeep + nb * 3 * E * LV : qs.at(me);
      float* O = okeep ? okeep + nb * E * LV : os.at(me);
      unit_pack(x + nb * V * xb, xb, xl, L, E, nv, X);
      if (ln)
        for (i64 l = 0; l < L; ++l)
          ln_vectors(X + l * V, E, LV, lnw, lnb, eps, nv, mean + nb * V * L + l, rstd + nb * V * L + l, L);
      unit_spmm(X, L, p1, c1, v1, 3 * E, b1, nv, Q);
      for (i64 h = 0; h < H; ++h) {
        head_in(Q, L, D, h * D, q);
        head_in(Q, L, D, E + h * D, k);
        head_in(Q, L, D, 2 * E + h * D, v);
        att_forward_unit(q, k, v, L, D, scale, P ? P + (nb * H + h) * L * L * V : pb.at(me), ob);
        head_out(ob, L, D, h * D, O);
      }
      unit_spmm(O, L, p2, c2, v2, E, nullptr, V, ys.at(me));
      unit_unpack(ys.at(me), L, E, y + nb * V * yb, yb, yl, nv, b2, res ? x + nb * V * xb : nullptr, xb, xl);
    }
  }
  return 0;
}

// Gradients of the forward above for gy (B, L, E; strides gb, gl) from its keeps: gx (strides gxb,
// gxl), the weight gradients at the nonzeros written into the dense gw1 (3E, E) and gw2 (E, E) at the
// storage offsets woff1 / woff2 (zero1 / zero2: row-major, zeroed here, else the caller zeroed
// them), the bias gradients gb1 (3E) and gb2 (E); each output NULL: skipped. The projections as in
// the forward plus their transposed structure (colptr, rowidx, perm; as spfde_linear_backward reads
// it). gx, gw1 and gb1 need qkvkeep and P, gw1 xkeep, gw2 okeep. ln as in the forward; res (the
// forward's residual): gy is added to gx (after the norm's backward). Returns 0, or 1 when out of memory.
int spfde_mha_backward(const float* gy, i64 gb, i64 gl, i64 B, i64 L, i64 E, i64 H, float scale, const int32_t* p1,
                       const int32_t* c1, const float* w1, const int32_t* tp1, const int32_t* tc1, const int32_t* perm1,
                       const i64* woff1, const int32_t* p2, const int32_t* c2, const float* w2, const int32_t* tp2,
                       const int32_t* tc2, const int32_t* perm2, const i64* woff2, const float* xkeep,
                       const float* qkvkeep, const float* P, const float* okeep, float* gx, i64 gxb, i64 gxl, float* gw1,
                       int zero1, float* gb1, float* gw2, int zero2, float* gb2, int nthreads, int ln, const float* x,
                       i64 xb, i64 xl, const float* lnw, const float* mean, const float* rstd, float* glnw,
                       float* glnb, int res) {
  const i64 E3 = 3 * E, nnz1 = p1[E3], nnz2 = p2[E];
  if (B <= 0 || L <= 0) {
    if (gw1 && zero1) std::memset(gw1, 0, sizeof(float) * size_t(E3 * E));
    if (gw2 && zero2) std::memset(gw2, 0, sizeof(float) * size_t(E * E));
    if (gb1) std::memset(gb1, 0, sizeof(float) * size_t(E3));
    if (gb2) std::memset(gb2, 0, sizeof(float) * size_t(E));
    if (glnw) std::memset(glnw, 0, sizeof(float) * size_t(E));
    if (glnb) std::memset(glnb, 0, sizeof(float) * size_t(E));
    return 0;
  }
  const i64 D = E / H, NB = (B + V - 1) / V, LV = L * V, LDV = L * D * V, pieces = (L + 7) / 8;
  const int nt = nthreads > 0 ? nthreads : 1;
  const bool through = gx || gw1 || gb1;  // the gradient goes back through the core
  const std::vector<i64> cuts1 = gw1 ? row_chunks(p1, E3, nthreads) : std::vector<i64>{0};
  const std::vector<i64> cuts2 = gw2 ? row_chunks(p2, E, nthreads) : std::vector<i64>{0};
  const i64 ch1 = i64(cuts1.size()) - 1, ch2 = i64(cuts2.size()) - 1;
  Scratch gu(NB * E * LV, 1, false), du(NB * E3 * LV, through ? 1 : 0, false), go(E * LV, through ? nt : 0, false),
      hs(7 * LDV + L * L * V, through ? nt : 0, false), xg(E * LV, gx ? nt : 0, false), cw1(nnz1, gx ? 1 : 0, false),
      cw2(nnz2, through ? 1 : 0, false), acc1(nnz1 * V, gw1 ? 1 : 0, false), acc2(nnz2 * V, gw2 ? 1 : 0, false),
      sums1(nnz1, gw1 ? 1 : 0, false), sums2(nnz2, gw2 ? 1 : 0, false),
      lnp(NB * 2 * E, ln && gx && (glnw || glnb) ? 1 : 0, false);  // per unit: the norm's scale, shift sums
  if (!gu.p || (through && (!du.p || !go.p || !hs.p || !cw2.p)) || (gx && (!xg.p || !cw1.p)) ||
      (gw1 && (!acc1.p || !sums1.p)) || (gw2 && (!acc2.p || !sums2.p)) || (ln && gx && (glnw || glnb) && !lnp.p))
    return 1;
#pragma omp parallel num_threads(nthreads)
  {
    const int me = omp_get_thread_num();
    if (gx) {
#pragma omp for schedule(static) nowait
      for (i64 j = 0; j < nnz1; ++j) cw1.p[j] = w1[woff1[perm1[j]]];
    }
    if (through) {
#pragma omp for schedule(static)
      for (i64 j = 0; j < nnz2; ++j) cw2.p[j] = w2[woff2[perm2[j]]];
    }
#pragma omp for schedule(dynamic, 1)
    for (i64 nb = 0; nb < NB; ++nb) {
      const int nv = int(B - nb * V < V ? B - nb * V : V);
      float* G = gu.p + nb * E * LV;
      unit_pack(gy + nb * V * gb, gb, gl, L, E, nv, G);
      if (!through) continue;
      float* GO = go.at(me);
      float* DQ = du.p + nb * E3 * LV;
      const float* Q = qkvkeep + nb * E3 * LV;
      float* q = hs.at(me);
      float *k = q + LDV, *v = k + LDV, *g = v + LDV, *dq = g + LDV, *dk = dq + LDV, *dv = dk + LDV, *ds = dv + LDV;
      unit_spmm(G, L, tp2, tc2, cw2.p, E, nullptr, V, GO);  // out_proj's input gradient
      for (i64 h = 0; h < H; ++h) {
        head_in(Q, L, D, h * D, q);
        head_in(Q, L, D, E + h * D, k);
        head_in(Q, L, D, 2 * E + h * D, v);
        head_in(GO, L, D, h * D, g);
        att_backward_unit(q, k, v, g, P + (nb * H + h) * L * L * V, L, D, scale, dq, dk, dv, ds);
        head_out(dq, L, D, h * D, DQ);
        head_out(dk, L, D, E + h * D, DQ);
        head_out(dv, L, D, 2 * E + h * D, DQ);
      }
      if (gx) {
        unit_spmm(DQ, L, tp1, tc1, cw1.p, E, nullptr, V, xg.at(me));  // in_proj's input gradient
        unit_unpack(xg.at(me), L, E, gx + nb * V * gxb, gxb, gxl, nv, nullptr,
                    res && !ln ? gy + nb * V * gb : nullptr, gb, gl);
        if (ln) {  // the unit's rows of gx are complete: through the norm, sample by sample
          float* part = lnp.p ? lnp.p + nb * 2 * E : nullptr;
          if (part) std::memset(part, 0, sizeof(float) * size_t(2 * E));
          for (int j = 0; j < nv; ++j) {
            const i64 b = nb * V + j;
            ln_backward_rows(gx + b * gxb, gxl, x + b * xb, xl, E, 0, L, lnw, mean + b * L, rstd + b * L,
                             glnw ? part : nullptr, glnb ? part + E : nullptr, res ? gy + b * gb : nullptr, gl);
          }
        }
      }
    }
    // the implicit barrier above: every unit's gradients are in unit layout
#pragma omp for schedule(dynamic, 1) nowait
    for (i64 c = 0; c < ch1 + ch2; ++c)
      for (i64 u = 0; u < NB; ++u)
        for (i64 p = 0; p < pieces; ++p) {
          if (c < ch1)
            unit_wgrad(xkeep, E, du.p, E3, NB, L, u, p, p1, c1, cuts1[c], cuts1[c + 1], acc1.p, sums1.p, gw1, woff1,
                       zero1 != 0);
          else
            unit_wgrad(okeep, E, gu.p, E, NB, L, u, p, p2, c2, cuts2[c - ch1], cuts2[c - ch1 + 1], acc2.p, sums2.p,
                       gw2, woff2, zero2 != 0);
        }
    const i64 g1 = gb1 ? (E3 + V - 1) / V : 0, g2 = gb2 ? (E + V - 1) / V : 0;
#pragma omp for schedule(static) nowait
    for (i64 j = 0; j < g1 + g2; ++j) {
      if (j < g1)
        unit_bias_grad(du.p, E3, NB, L, j * V, (j + 1) * V < E3 ? (j + 1) * V : E3, gb1);
      else
        unit_bias_grad(gu.p, E, NB, L, (j - g1) * V, (j - g1 + 1) * V < E ? (j - g1 + 1) * V : E, gb2);
    }
    if (ln && gx && (glnw || glnb)) ln_param_grads(lnp.p, NB, E, glnw, glnb);
  }
  return 0;
}

}  // extern "C"

extern "C" {

// Exact input fingerprints for the activation cache (spfde/freezing/cache.py, fingerprint): per
// row of signed 16-bit words, two weighted sums in int64. |word| <= 2^15 and weights < 2^24 over at
// most 2^24 words cannot overflow, so every order of the sums gives the pure-PyTorch path's result
// bit for bit; this only skips its int64 temporaries (a tenth of the time on a ViT-preset batch).
int spfde_fingerprint(const int16_t* words, i64 rows, i64 len, i64 rs, const int64_t* w, int64_t* out,
                      int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (i64 r = 0; r < rows; ++r) {
    const int16_t* p = words + r * rs;
    const int64_t* w0 = w;
    const int64_t* w1 = w + len;
    int64_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (i64 j = 0; j < len; ++j) {
      const int64_t v = p[j];
      a += v * w0[j];
      b += v * w1[j];
    }
    out[2 * r] = a;
    out[2 * r + 1] = b;
  }
  return 0;
}

}  // extern "C"
