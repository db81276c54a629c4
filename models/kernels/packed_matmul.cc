// Skinny matrix products for decoding on x86 CPUs: y[M, N] = x[M, K] @ W[K, N] with few rows
// (M = 1 for a greedy step, a few to a few dozen for a speculative verification or a small
// batch), reading each weight once per call.
//
// Why: XLA:CPU runs a 1-row product as a streaming matrix-vector kernel, but a 2-16-row one as
// a general matrix product that repacks the whole weight matrix on every call, so its cost
// grows to 3-4x the weight read. Here the weights are packed once, at load time, into column
// panels of 16 ([N/16, K, 16], contiguous per panel), and each panel is streamed once while
// the row block's accumulators stay in registers (up to 6 rows x 16 columns = 12 AVX2
// registers). Rows beyond 6 re-read the panel from cache in blocks of `kBlock` k-steps.
//
// Every output element is the sum over k in increasing order, with one fused multiply-add per
// step, whatever M is and however the rows are blocked (partial sums go through memory
// exactly): a row's result does not depend on the other rows of the call. Weights may be
// float32 or bfloat16 (widened exactly to float32 on load); activations and results are
// float32. Panels are split between the threads of XLA's intra-op pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;     // output columns per panel: two 8-lane vectors
constexpr int64_t kRows = 6;       // rows per register block (6 x 2 accumulators)
constexpr int64_t kBlock = 128;    // k-steps per block when a panel serves several row blocks
constexpr int64_t kPrefetch = 256; // elements ahead of the current k-step to prefetch

inline void load_pair(const float* w, __m256* lo, __m256* hi) {
  *lo = _mm256_loadu_ps(w);
  *hi = _mm256_loadu_ps(w + 8);
}

inline __m256 widen_bf16(__m128i h) {  // 8 bfloat16 -> 8 float32, exact
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void load_pair(const uint16_t* w, __m256* lo, __m256* hi) {
  *lo = widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  *hi = widen_bf16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8)));
}

// Rows [0, R) of x (row stride K) times panel rows [k0, k1), added to y (row stride N) at
// column n0, or written there when k0 == 0.
template <int R, typename W>
inline void block(const float* __restrict x, const W* __restrict panel, float* __restrict y,
                  int64_t K, int64_t N, int64_t n0, int64_t k0, int64_t k1) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    if (k0 == 0) {
      acc[r][0] = _mm256_setzero_ps();
      acc[r][1] = _mm256_setzero_ps();
    } else {
      acc[r][0] = _mm256_loadu_ps(y + r * N + n0);
      acc[r][1] = _mm256_loadu_ps(y + r * N + n0 + 8);
    }
  }
  for (int64_t k = k0; k < k1; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(panel + k * kPanel + kPrefetch), _MM_HINT_T0);
    __m256 lo, hi;
    load_pair(panel + k * kPanel, &lo, &hi);
    for (int r = 0; r < R; ++r) {
      const __m256 b = _mm256_broadcast_ss(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(b, lo, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, hi, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * N + n0, acc[r][0]);
    _mm256_storeu_ps(y + r * N + n0 + 8, acc[r][1]);
  }
}

template <typename W>
void panels(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N,
            int64_t p_begin, int64_t p_end) {
  const int64_t step = M <= kRows ? K : kBlock;
  for (int64_t p = p_begin; p < p_end; ++p) {
    const W* panel = w + p * K * kPanel;
    for (int64_t k0 = 0; k0 < K; k0 += step) {
      const int64_t k1 = std::min(K, k0 + step);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (std::min(kRows, M - m0)) {
          case 6: block<6>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
          case 5: block<5>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
          case 4: block<4>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
          case 3: block<3>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
          case 2: block<2>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
          default: block<1>(xm, panel, ym, K, N, p * kPanel, k0, k1); break;
        }
      }
    }
  }
}

// x: [..., K] float32; w: [1..., N/16, K, 16] packed panels (leading dims of size 1, which
// vmap adds to an unbatched operand); y: [..., N] float32.
template <typename W, ffi::DataType T>
ffi::Error packed_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w,
                         ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() < 3 || wd[wd.size() - 1] != kPanel) {
    return ffi::Error::InvalidArgument("packed weights must have shape [N/16, K, 16]");
  }
  for (size_t i = 0; i + 3 < wd.size(); ++i) {
    if (wd[i] != 1) {
      return ffi::Error::InvalidArgument("packed weights cannot be batched (vmap over weights)");
    }
  }
  const int64_t num_panels = wd[wd.size() - 3], K = wd[wd.size() - 2], N = num_panels * kPanel;
  const auto xd = x.dimensions();
  if (xd.size() < 1 || xd[xd.size() - 1] != K) {
    return ffi::Error::InvalidArgument("activations' last dimension must equal the weights' K");
  }
  const int64_t M = K == 0 ? 0 : static_cast<int64_t>(x.element_count()) / K;
  if (static_cast<int64_t>(y->element_count()) != M * N) {
    return ffi::Error::InvalidArgument("result shape must be [..., N]");
  }
  const float* xp = x.typed_data();
  const W* wp = reinterpret_cast<const W*>(w.untyped_data());
  float* yp = y->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(yp, yp + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t shares = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), num_panels));
  if (shares == 1) {
    panels(xp, wp, yp, M, K, N, 0, num_panels);
    return ffi::Error::Success();
  }
  // Shares are claimed from a counter by the caller and by helper tasks alike, so the call
  // finishes even when no pool thread is free (another kernel may hold it); the state lives
  // on the heap because a helper may start after the call has returned (it then finds no
  // share left and touches nothing else).
  struct Job {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto job = std::make_shared<Job>();
  auto work = [=]() {
    for (int64_t i; (i = job->next.fetch_add(1, std::memory_order_relaxed)) < shares;) {
      panels(xp, wp, yp, M, K, N, num_panels * i / shares, num_panels * (i + 1) / shares);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < shares; ++i) pool.Schedule([work] { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < shares) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodaxPackedMatmulF32, (packed_matmul<float, ffi::F32>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodaxPackedMatmulBF16, (packed_matmul<uint16_t, ffi::BF16>),
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
