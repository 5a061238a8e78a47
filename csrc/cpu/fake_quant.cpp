// CPU kernels of the fake-quantize family and the quantizer state updates.
// Each op is at most two passes over memory: one abs-max reduction and one quantize pass, both
// vectorised (see simd.h) and split over threads with at::parallel_for.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "cpu/simd.h"
#include "quant_math.h"

namespace qkernels {
namespace {

constexpr int64_t kGrain = 1 << 15;

// Bits of finite_abs(x): non-negative floats order like their bit patterns, and an integer max
// always vectorises.
template <typename T>
QK_INLINE uint32_t abs_bits(T v) {
  float f = finite_abs(to_float(v));
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

QK_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
QK_INLINE uint32_t abs_max_bits_body(const T* x, int64_t n) {
  uint32_t m = 0;
  // GCC 12 does not if-convert this reduction on its own; the pragma makes it vectorise.
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t a = abs_bits(x[i]);
    m = a > m ? a : m;
  }
  return m;
}
QK_DEFINE_ISA_DISPATCH(abs_max_bits, abs_max_bits_body)

template <typename T>
QK_INLINE int fake_quant_body(const T* x, T* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(fake_quant(to_float(x[i]), p));
  return 0;
}
QK_DEFINE_ISA_DISPATCH(fake_quant_run, fake_quant_body)

template <typename T>
QK_INLINE int quantize8_body(const T* x, int8_t* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = (int8_t)quant_code_int(to_float(x[i]), p);
  return 0;
}
QK_DEFINE_ISA_DISPATCH(quantize8_run, quantize8_body)

template <typename T>
QK_INLINE int quantize16_body(const T* x, int16_t* out, int64_t n, QuantParams p) {
  for (int64_t i = 0; i < n; ++i) out[i] = (int16_t)quant_code_int(to_float(x[i]), p);
  return 0;
}
QK_DEFINE_ISA_DISPATCH(quantize16_run, quantize16_body)

template <typename T>
QK_INLINE int clip_grad_body(const T* g, const T* x, T* out, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) {
    float xv = to_float(x[i]);
    float a = fabsf(xv);
    bool pass = a <= s;  // false for NaN and for Inf beyond any usable scale
    out[i] = pass ? g[i] : from_float<T>(0.f);
  }
  return 0;
}
QK_DEFINE_ISA_DISPATCH(clip_grad_run, clip_grad_body)

// Block-level entry points. float and bfloat16 run the vectorised bodies directly; half goes through
// a float staging buffer (see half_to_float in simd.h).
constexpr int64_t kStage = 2048;

template <typename F>
void for_each_stage(int64_t n, F&& f) {
  for (int64_t b = 0; b < n; b += kStage) f(b, std::min(kStage, n - b));
}

template <typename T>
uint32_t abs_max_block(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    uint32_t m = 0;
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      m = std::max(m, abs_max_bits<float>(buf, len));
    });
    return m;
  } else {
    return abs_max_bits<T>(x, n);
  }
}

template <typename T>
void fake_quant_block(const T* x, T* out, int64_t n, const QuantParams& p) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      fake_quant_run<float>(buf, buf, len, p);
      float_to_half(buf, out + b, len);
    });
  } else {
    fake_quant_run<T>(x, out, n, p);
  }
}

template <typename T, typename Code>
void quantize_block(const T* x, Code* out, int64_t n, const QuantParams& p) {
  auto run = [&](auto* src, Code* dst, int64_t len) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(src)>>;
    if constexpr (std::is_same_v<Code, int8_t>)
      quantize8_run<S>(src, dst, len, p);
    else
      quantize16_run<S>(src, dst, len, p);
  };
  if constexpr (std::is_same_v<T, _Float16>) {
    float buf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(x + b, buf, len);
      run(static_cast<const float*>(buf), out + b, len);
    });
  } else {
    run(x, out, n);
  }
}

template <typename T>
void clip_grad_block(const T* g, const T* x, T* out, int64_t n, float s) {
  if constexpr (std::is_same_v<T, _Float16>) {
    float gbuf[kStage], xbuf[kStage];
    for_each_stage(n, [&](int64_t b, int64_t len) {
      half_to_float(g + b, gbuf, len);
      half_to_float(x + b, xbuf, len);
      clip_grad_run<float>(static_cast<const float*>(gbuf), static_cast<const float*>(xbuf), gbuf, len, s);
      float_to_half(gbuf, out + b, len);
    });
  } else {
    clip_grad_run<T>(g, x, out, n, s);
  }
}

// Codes are written as int8 (bits <= 8) or int16 into `out`, whichever dtype it has.
template <typename T>
void quantize_codes_block(const T* x, at::Tensor& out, int64_t offset, int64_t n, const QuantParams& p) {
  if (out.scalar_type() == at::kChar)
    quantize_block<T, int8_t>(x, out.data_ptr<int8_t>() + offset, n, p);
  else
    quantize_block<T, int16_t>(x, out.data_ptr<int16_t>() + offset, n, p);
}

template <typename T>
float abs_max_of(const T* x, int64_t n) {
  uint32_t m = at::parallel_reduce(
      int64_t(0), n, kGrain, uint32_t(0),
      [&](int64_t b, int64_t e, uint32_t acc) { return std::max(acc, abs_max_block<T>(x + b, e - b)); },
      [](uint32_t a, uint32_t b) { return std::max(a, b); });
  return bits_to_float(m);
}

float scale_value(const at::Tensor& scale) { return *scale.data_ptr<float>(); }

at::Tensor new_scalar(const at::Tensor& like, float v) {
  at::Tensor s = at::empty({}, like.options().dtype(at::kFloat));
  *s.data_ptr<float>() = v;
  return s;
}

// Writes fake_quant(x) or its integer codes into `out` with one scale for the whole tensor.
void quantize_pass(const at::Tensor& xc, at::Tensor& out, float s, int64_t bits, bool codes) {
  const QuantParams p = make_params(s, bin_count(bits));
  const int64_t n = xc.numel();
  QK_DISPATCH_FLOATING(xc.scalar_type(), "quantize", [&] {
    const T* x = static_cast<const T*>(xc.data_ptr());
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if (!codes)
        fake_quant_block<T>(x + b, static_cast<T*>(out.data_ptr()) + b, e - b, p);
      else
        quantize_codes_block<T>(x + b, out, b, e - b, p);
    });
  });
}

at::Tensor abs_max_cpu(const at::Tensor& x) {
  check_float_input(x, "x");
  at::Tensor xc = x.contiguous();
  return new_scalar(x, QK_DISPATCH_FLOATING(xc.scalar_type(), "abs_max", [&] {
    return abs_max_of(static_cast<const T*>(xc.data_ptr()), xc.numel());
  }));
}

std::tuple<at::Tensor, at::Tensor> abs_max_quant(const at::Tensor& x, int64_t bits, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  at::Tensor xc = x.contiguous();
  at::Tensor scale = abs_max_cpu(xc);
  at::Tensor out = codes ? at::empty(xc.sizes(), xc.options().dtype(code_dtype(bits))) : at::empty_like(xc);
  quantize_pass(xc, out, scale_value(scale), bits, codes);
  return {out, scale};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_abs_max_cpu(const at::Tensor& x, int64_t bits, bool /*clip_grad*/) {
  return abs_max_quant(x, bits, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_abs_max_cpu(const at::Tensor& x, int64_t bits) {
  return abs_max_quant(x, bits, true);
}

at::Tensor with_scale_quant(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  check_scalar_scale(scale, x, "scale");
  at::Tensor xc = x.contiguous();
  at::Tensor out = codes ? at::empty(xc.sizes(), xc.options().dtype(code_dtype(bits))) : at::empty_like(xc);
  quantize_pass(xc, out, scale_value(scale.contiguous()), bits, codes);
  return out;
}

at::Tensor fake_quant_with_scale_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits, bool /*clip_grad*/) {
  return with_scale_quant(x, scale, bits, false);
}

at::Tensor quantize_with_scale_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t bits) {
  return with_scale_quant(x, scale, bits, true);
}

// x viewed as [outer, channels, inner] around `axis`.
std::tuple<at::Tensor, at::Tensor> channel_wise_quant(const at::Tensor& x, int64_t bits, int64_t axis, bool codes) {
  check_float_input(x, "x");
  check_bits(bits);
  axis = wrap_axis(axis, x);
  at::Tensor xc = x.contiguous();
  const ChannelLayout layout = channel_layout(xc, axis);
  const int64_t outer = layout.outer, channels = layout.channels, inner = layout.inner;
  at::Tensor scales = at::empty({channels}, xc.options().dtype(at::kFloat));
  at::Tensor out = codes ? at::empty(xc.sizes(), xc.options().dtype(code_dtype(bits))) : at::empty_like(xc);
  float* sp = scales.data_ptr<float>();
  const int bin = bin_count(bits);
  QK_DISPATCH_FLOATING(xc.scalar_type(), "channel-wise quantize", [&] {
    const T* xp = static_cast<const T*>(xc.data_ptr());
    at::parallel_for(0, channels, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        uint32_t m = 0;
        for (int64_t o = 0; o < outer; ++o) m = std::max(m, abs_max_block<T>(xp + (o * channels + c) * inner, inner));
        sp[c] = bits_to_float(m);
      }
    });
    const int64_t rows = outer * channels;
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)), [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r) {
        const QuantParams p = make_params(sp[r % channels], bin);
        const T* src = xp + r * inner;
        if (!codes)
          fake_quant_block<T>(src, static_cast<T*>(out.data_ptr()) + r * inner, inner, p);
        else
          quantize_codes_block<T>(src, out, r * inner, inner, p);
      }
    });
  });
  return {out, scales};
}

std::tuple<at::Tensor, at::Tensor> fake_channel_wise_quant_abs_max_cpu(const at::Tensor& x, int64_t bits, int64_t axis,
                                                                      bool /*clip_grad*/) {
  return channel_wise_quant(x, bits, axis, false);
}

std::tuple<at::Tensor, at::Tensor> quantize_channel_wise_abs_max_cpu(const at::Tensor& x, int64_t bits, int64_t axis) {
  return channel_wise_quant(x, bits, axis, true);
}

at::Tensor fake_quant_clip_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale) {
  check_clip_grad_args(grad, x, scale);
  at::Tensor gc = grad.contiguous(), xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const float s = scale_value(scale.contiguous());
  QK_DISPATCH_FLOATING(xc.scalar_type(), "fake_quant_clip_grad", [&] {
    const T* g = static_cast<const T*>(gc.data_ptr());
    const T* xp = static_cast<const T*>(xc.data_ptr());
    T* o = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, xc.numel(), kGrain, [&](int64_t b, int64_t e) { clip_grad_block<T>(g + b, xp + b, o + b, e - b, s); });
  });
  return out;
}

void range_abs_max_update_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& window,
                              const at::Tensor& step, int64_t window_size) {
  check_range_abs_max_state(x, scale, window, step, window_size);
  const float cur = scale_value(abs_max_cpu(x));
  float* w = window.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  int64_t valid = 0;
  if (range_abs_max_step(cur, w, step.data_ptr<int64_t>(), window_size, s, &valid)) *s = *std::max_element(w, w + valid);
}

void moving_average_abs_max_update_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& accum,
                                       const at::Tensor& state, double moving_rate) {
  check_moving_average_state(x, scale, accum, state, moving_rate);
  const float cur = scale_value(abs_max_cpu(x));
  moving_average_step(cur, (float)moving_rate, accum.data_ptr<float>(), state.data_ptr<float>(), scale.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(qkernels, CPU, m) {
  m.impl("abs_max", &abs_max_cpu);
  m.impl("fake_quant_abs_max", &fake_quant_abs_max_cpu);
  m.impl("quantize_abs_max", &quantize_abs_max_cpu);
  m.impl("fake_quant_with_scale", &fake_quant_with_scale_cpu);
  m.impl("quantize_with_scale", &quantize_with_scale_cpu);
  m.impl("fake_channel_wise_quant_abs_max", &fake_channel_wise_quant_abs_max_cpu);
  m.impl("quantize_channel_wise_abs_max", &quantize_channel_wise_abs_max_cpu);
  m.impl("fake_quant_clip_grad", &fake_quant_clip_grad_cpu);
  m.impl("range_abs_max_update_", &range_abs_max_update_cpu);
  m.impl("moving_average_abs_max_update_", &moving_average_abs_max_update_cpu);
}

}  // namespace qkernels
