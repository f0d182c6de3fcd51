// exp for the loops that take one per element: SwiGLU's sigmoid (small.cpp), attention's softmax
// (attend.cpp). std::exp is a call that keeps such a loop scalar.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

namespace mixtral_kernels {

// exp(x) as Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so r is exact to
// float32), exp(r) by a degree-7 polynomial, 2^n put in the exponent bits. No branch and no call, so
// a loop of it vectorizes (in the files CMakeLists builds with -fno-trapping-math). x is clamped to
// [-87, 88], where exp stays a normal float, by comparisons: std::fmin and std::fmax (NaN-aware) were
// two libm calls an element and kept the loop scalar (16 sequences' SwiGLU, 32 x 3584 a layer, took
// 0.9 ms). NaN stays NaN.
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((int32_t(n) + 127) << 23);
}

} // namespace mixtral_kernels
