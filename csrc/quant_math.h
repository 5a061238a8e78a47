// Quantization arithmetic shared by the CPU and CUDA kernels, so both compute bit-identical results.
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline __attribute__((always_inline))
#endif

namespace qkernels {

// Scales at or below this are treated as zero: the quantizer then outputs zeros, never NaN/Inf.
constexpr float kMinScale = 1e-30f;

QK_HD int bin_count(int64_t bits) { return (1 << (bits - 1)) - 1; }

QK_HD bool scale_is_usable(float s) { return s > kMinScale && s <= FLT_MAX; }

// |x| for finite x, else 0: NaN and +-Inf never set a scale (they are clipped when quantized).
QK_HD float finite_abs(float x) {
  float a = fabsf(x);
  return a <= FLT_MAX ? a : 0.f;
}

// C round(): halves go away from zero. Written with trunc so compilers vectorise it.
QK_HD float round_half_away(float v) {
  float t = truncf(v);
  float d = v - t;  // exact for floats
  return t + (d >= 0.5f ? 1.f : 0.f) - (d <= -0.5f ? 1.f : 0.f);
}

// Clamp to [-s, s]; NaN passes through (both comparisons are false).
QK_HD float clip_to(float x, float s) { return x > s ? s : (x < -s ? -s : x); }

// Everything a quantize-dequantize pass needs from one scale, computed once per tensor/channel.
struct QuantParams {
  float scale;     // clip bound (0 when unusable)
  float inv_step;  // bin / scale (0 when unusable, so codes are 0)
  float step;      // scale / bin (0 when unusable, so outputs are 0)
};

QK_HD QuantParams make_params(float s, int bin) {
  QuantParams p;
  if (scale_is_usable(s)) {
    p.scale = s;
    p.inv_step = (float)bin / s;
    p.step = s / (float)bin;
  } else {
    p.scale = 0.f;
    p.inv_step = 0.f;
    p.step = 0.f;
  }
  return p;
}

// The integer code as a float (NaN stays NaN here).
QK_HD float quant_code(float x, const QuantParams& p) { return round_half_away(clip_to(x, p.scale) * p.inv_step); }

QK_HD float fake_quant(float x, const QuantParams& p) { return quant_code(x, p) * p.step; }

// Integer code for storage: NaN becomes 0 (casting NaN to an integer is undefined).
QK_HD int32_t quant_code_int(float x, const QuantParams& p) {
  float c = quant_code(x, p);
  return c == c ? (int32_t)c : 0;
}

// Requantize an accumulator epilogue value to int8: round half away, saturate to [-127, 127].
QK_HD int8_t saturate_int8(float v) {
  float r = round_half_away(v);
  r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
  return r == r ? (int8_t)r : (int8_t)0;
}

// One step of the range_abs_max state machine (reference FindRangeAbsMax), on a single thread.
// Returns true when the evicted value was the maximum and the caller must rescan the window
// (its first `valid` entries); otherwise *scale is already final.
QK_HD bool range_abs_max_step(float cur, float* window, int64_t* step, int64_t window_size, float* scale,
                              int64_t* valid) {
  int64_t it = *step;
  int64_t idx = it % window_size;
  float removed = window[idx];
  window[idx] = cur;
  *step = it + 1;
  *valid = it + 1 < window_size ? it + 1 : window_size;
  float last = *scale;
  if (cur > last) {
    *scale = cur;
    return false;
  }
  return removed == last;
}

// One step of the moving_average_abs_max state (reference formulas), on a single thread. The products
// and sums are explicit fmaf: nvcc contracts `rate * state + 1` into one FMA by default and the host
// compiler does not, which made CPU and GPU scales drift apart by ulps over the steps.
QK_HD void moving_average_step(float cur, float rate, float* accum, float* state, float* scale) {
  *state = fmaf(rate, *state, 1.f);
  *accum = fmaf(rate, *accum, cur);
  *scale = *accum / *state;
}

}  // namespace qkernels
