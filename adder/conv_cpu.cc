// Direct 2-D convolutions for XLA:CPU, called through the XLA FFI
// (`adder.conv_cpu` compiles this file on first use with the host's compiler).
//
// Layouts are the model's: input x (N, H, W, Ci) NHWC, kernel k (KH, KW, Ci, Co)
// HWIO, output y (N, H - KH + 1, W - KW + 1, Co), all float32, row-major. Stride
// 1, no padding (VALID). Co must be a multiple of 16: the output channels of a
// pixel are one vector of 16 floats (a zmm register with AVX-512, two ymm with
// AVX2), and every multiply-add broadcasts one input value against it.
//
// AdderConvForward: y = conv(x, k).
// AdderConvKernelGrad: dk[i, j, c, o] = sum over n, h, w of
//   x[n, h + i, w + j, c] * g[n, h, w, o], for g (N, Ho, Wo, Co): the
//   kernel's gradient. The input's gradient is AdderConvForward of the padded
//   g with the flipped, transposed kernel (see adder/conv_cpu.py).
//
// Work is split over the batch between XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void Store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }

// How many accumulators fit in the vector registers: output pixels of a
// forward block (the widest first), input channels of a kernel-gradient block.
#ifdef __AVX512F__
constexpr int kWide = 12, kNarrow = 8, kChannels = 16;  // 32 zmm registers
#else
constexpr int kWide = 6, kNarrow = 4, kChannels = 6;  // 16 ymm, two per vector
#endif

struct Shape {
  int64_t n, h, w, ci, kh, kw, co;
  int64_t ho() const { return h - kh + 1; }
  int64_t wo() const { return w - kw + 1; }
};

// y[oh, ow .. ow + B) (16 channels from o) of one image.
template <int B>
inline void ForwardBlock(const float* x, const float* k, float* y, const Shape& s, int64_t oh,
                         int64_t ow, int64_t o) {
  v16 acc[B];
  for (int b = 0; b < B; ++b) acc[b] = v16{};
  for (int64_t i = 0; i < s.kh; ++i) {
    for (int64_t j = 0; j < s.kw; ++j) {
      const float* xr = x + ((oh + i) * s.w + ow + j) * s.ci;
      const float* kr = k + ((i * s.kw + j) * s.ci) * s.co + o;
      for (int64_t c = 0; c < s.ci; ++c) {
        const v16 kv = Load(kr + c * s.co);
        for (int b = 0; b < B; ++b) acc[b] += xr[b * s.ci + c] * kv;
      }
    }
  }
  float* yr = y + (oh * s.wo() + ow) * s.co + o;
  for (int b = 0; b < B; ++b) Store(yr + b * s.co, acc[b]);
}

void ForwardImages(const float* x, const float* k, float* y, const Shape& s, int64_t n0,
                   int64_t n1) {
  const int64_t ho = s.ho(), wo = s.wo();
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * s.h * s.w * s.ci;
    float* yn = y + n * ho * wo * s.co;
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t o = 0; o < s.co; o += 16) {
        int64_t ow = 0;
        for (; ow + kWide <= wo; ow += kWide) ForwardBlock<kWide>(xn, k, yn, s, oh, ow, o);
        for (; ow + kNarrow <= wo; ow += kNarrow) ForwardBlock<kNarrow>(xn, k, yn, s, oh, ow, o);
        for (; ow + 2 <= wo; ow += 2) ForwardBlock<2>(xn, k, yn, s, oh, ow, o);
        for (; ow < wo; ++ow) ForwardBlock<1>(xn, k, yn, s, oh, ow, o);
      }
    }
  }
}

// dk[i, j, c0 .. c0 + C, o .. o + 16) += the sum over the images' pixels.
template <int C>
inline void KernelGradBlock(const float* x, const float* g, float* dk, const Shape& s,
                            int64_t n0, int64_t n1, int64_t i, int64_t j, int64_t c0,
                            int64_t o) {
  const int64_t ho = s.ho(), wo = s.wo();
  v16 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = v16{};
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * s.h * s.w * s.ci;
    const float* gn = g + n * ho * wo * s.co;
    for (int64_t oh = 0; oh < ho; ++oh) {
      for (int64_t ow = 0; ow < wo; ++ow) {
        const v16 gv = Load(gn + (oh * wo + ow) * s.co + o);
        const float* xr = xn + ((oh + i) * s.w + ow + j) * s.ci + c0;
        for (int c = 0; c < C; ++c) acc[c] += xr[c] * gv;
      }
    }
  }
  float* out = dk + ((i * s.kw + j) * s.ci + c0) * s.co + o;
  for (int c = 0; c < C; ++c) Store(out + c * s.co, Load(out + c * s.co) + acc[c]);
}

void KernelGradImages(const float* x, const float* g, float* dk, const Shape& s, int64_t n0,
                      int64_t n1) {
  std::fill(dk, dk + s.kh * s.kw * s.ci * s.co, 0.0f);
  // One image at a time, so that its x and g stay in cache over the taps.
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i = 0; i < s.kh; ++i) {
      for (int64_t j = 0; j < s.kw; ++j) {
        for (int64_t o = 0; o < s.co; o += 16) {
          int64_t c = 0;
          for (; c + kChannels <= s.ci; c += kChannels) {
            KernelGradBlock<kChannels>(x, g, dk, s, n, n + 1, i, j, c, o);
          }
          for (; c < s.ci; ++c) KernelGradBlock<1>(x, g, dk, s, n, n + 1, i, j, c, o);
        }
      }
    }
  }
}

// Runs work(part) for every part in [0, parts) on this thread and the pool's;
// returns when all are done. Parts are claimed from a counter, so this thread
// does whatever the pool has not started: it never waits on a task still
// queued behind busy threads (XLA may run several of these calls at once).
template <typename Work>
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, const Work& work) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t finished = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, parts, &work] {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      work(p);  // only reached while the caller waits for this part
      std::lock_guard<std::mutex> lock(state->mu);
      if (++state->finished == parts) state->cv.notify_all();
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule(std::function<void()>(run));
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->finished == parts; });
}

int64_t Parts(ffi::ThreadPool& pool, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(n, pool.num_threads()));
}

ffi::Error CheckShapes(const Shape& s) {
  if (s.co % 16 != 0) return ffi::Error::InvalidArgument("output channels must be a multiple of 16");
  if (s.ho() < 1 || s.wo() < 1) return ffi::Error::InvalidArgument("kernel larger than the input");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), kd = k.dimensions();
  if (xd.size() != 4 || kd.size() != 4 || xd[3] != kd[2]) {
    return ffi::Error::InvalidArgument("expected x (N, H, W, Ci) and k (KH, KW, Ci, Co)");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3]};
  if (ffi::Error e = CheckShapes(s); e.failure()) return e;
  const int64_t parts = Parts(pool, s.n);
  ParallelFor(pool, parts, [&](int64_t p) {
    ForwardImages(x.typed_data(), k.typed_data(), y->typed_data(), s, s.n * p / parts,
                  s.n * (p + 1) / parts);
  });
  return ffi::Error::Success();
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dk) {
  auto xd = x.dimensions(), gd = g.dimensions(), kd = dk->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || kd.size() != 4 || xd[0] != gd[0] ||
      kd[2] != xd[3] || kd[3] != gd[3] || gd[1] != xd[1] - kd[0] + 1 ||
      gd[2] != xd[2] - kd[1] + 1) {
    return ffi::Error::InvalidArgument(
        "expected x (N, H, W, Ci), g (N, Ho, Wo, Co) and dk (KH, KW, Ci, Co)");
  }
  const Shape s{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], kd[3]};
  if (ffi::Error e = CheckShapes(s); e.failure()) return e;
  const int64_t parts = Parts(pool, s.n), size = s.kh * s.kw * s.ci * s.co;
  std::vector<float> partial((parts - 1) * size);
  ParallelFor(pool, parts, [&](int64_t p) {
    float* out = p == 0 ? dk->typed_data() : partial.data() + (p - 1) * size;
    KernelGradImages(x.typed_data(), g.typed_data(), out, s, s.n * p / parts,
                     s.n * (p + 1) / parts);
  });
  float* out = dk->typed_data();
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = partial.data() + (p - 1) * size;
    for (int64_t e = 0; e < size; ++e) out[e] += part[e];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderConvForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdderConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
