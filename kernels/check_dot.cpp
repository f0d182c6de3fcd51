// A check of dot.h alone, for whatever machine it is compiled for (tests/test_kernels.py builds it
// natively and for arm64, which it runs under qemu): each vector dot product against a double
// reference of the same integers, for 8 and 4 bits, groups of 32, 64 and 128, 1 to 11 groups.
//
// The bound: every path computes the same sum of K products (one per weight) plus K/G bias terms,
// in float32, in some order. Any order of summing n terms in float32 errs by at most
// n * u / (1 - n * u) * (sum of |terms|), u = 2^-24 (Higham, Accuracy and Stability, 4.3); the scale
// products add two roundings per group. So |got - reference| <= (K + 2 K / G + 2) * 1.01 u * S, with S
// the sum of the terms' magnitudes. The int16 path's integer dot products are exact.
// Where dot.h has dots_int16_rows (AVX2, AVX-512), each of its outputs must also be the bits dots_int16 gives.
// Prints "ok N" and exits 0, or prints each failure and exits 1.
#include "dot.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

using namespace mixtral_kernels;

struct Case {
  std::vector<uint8_t> w;
  std::vector<float> scales, biases, x, xsum, xs;
  std::vector<int16_t> xq;
};

static Case make(std::mt19937& rng, int bits, int G, int K) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> byte(0, 255), i16(-32767, 32767);
  Case c;
  c.w.resize(K * bits / 8);
  for (auto& b : c.w)
    b = uint8_t(byte(rng));
  for (int g = 0; g < K / G; ++g) {
    c.scales.push_back(0.01f * normal(rng));
    c.biases.push_back(normal(rng));
    c.xs.push_back(1e-4f * std::fabs(normal(rng)));
  }
  for (int k = 0; k < K; ++k) {
    c.x.push_back(normal(rng));
    c.xq.push_back(int16_t(i16(rng)));
  }
  for (int g = 0; g < K / G; ++g) {
    float s = 0;
    for (int k = g * G; k < (g + 1) * G; ++k)
      s += c.x[k];
    c.xsum.push_back(s);
  }
  return c;
}

// -> (reference, sum of the terms' magnitudes), in double.
static std::pair<double, double> reference(const Case& c, int bits, int G, int K, bool int16) {
  double total = 0, size = 0;
  for (int g = 0; g < K / G; ++g) {
    double acc = 0, mag = 0;
    for (int k = g * G; k < (g + 1) * G; ++k) {
      double term = (int16 ? double(c.xq[k]) : double(c.x[k])) * q_at(c.w.data(), k, bits);
      acc += term;
      mag += std::fabs(term);
    }
    const double scale = int16 ? double(c.scales[g]) * c.xs[g] : c.scales[g];
    total += scale * acc + double(c.biases[g]) * c.xsum[g];
    size += std::fabs(scale) * mag + std::fabs(double(c.biases[g]) * c.xsum[g]);
  }
  return {total, size};
}

template <int BITS>
static int check(std::mt19937& rng, int G, int K, int& cases) {
  const Case c = make(rng, BITS, G, K);
  const Row r{c.w.data(), c.scales.data(), c.biases.data()};
  int failures = 0;
  for (bool int16 : {false, true}) {
    const auto [ref, size] = reference(c, BITS, G, K, int16);
    const double bound = (K + 2.0 * K / G + 2) * 1.01 * std::ldexp(1.0, -24) * size;
    const float got[2] = {
        int16 ? dot_int16<BITS>(r, c.xq.data(), c.xs.data(), c.xsum.data(), K, G)
              : dot_exact<BITS>(r, c.x.data(), c.xsum.data(), K, G),
        int16 ? dot_int16_scalar<BITS>(r, c.xq.data(), c.xs.data(), c.xsum.data(), K, G)
              : dot_exact_scalar<BITS>(r, c.x.data(), c.xsum.data(), K, G),
    };
    for (int i = 0; i < 2; ++i, ++cases) {
      if (!(std::fabs(got[i] - ref) <= bound)) {
        std::printf("FAIL %s %s bits %d group %d K %d: %.9g, reference %.9g, bound %.3g\n",
                    i ? "scalar" : simd_name().c_str(), int16 ? "int16" : "exact", BITS, G, K, got[i], ref, bound);
        ++failures;
      }
    }
  }
  return failures;
}

#ifdef MK_DOTS_ROWS
// dots_int16_rows: NW weight rows (one after another) with R rows of x must give each output the bits
// dots_int16 gives it, one weight row at a time (qmm.cpp's passes take 3 to 6 rows of x so).
template <int BITS, int G, int R>
static int check_rows(std::mt19937& rng, int K, int& cases) {
  constexpr int NW = 2;
  std::vector<Case> w, x;
  for (int i = 0; i < NW; ++i)
    w.push_back(make(rng, BITS, G, K));
  for (int i = 0; i < R; ++i)
    x.push_back(make(rng, BITS, G, K));
  std::vector<uint8_t> packed;
  std::vector<float> scales, biases, xs, xsum;
  std::vector<int16_t> xq;
  for (const Case& c : w) {
    packed.insert(packed.end(), c.w.begin(), c.w.end());
    scales.insert(scales.end(), c.scales.begin(), c.scales.end());
    biases.insert(biases.end(), c.biases.begin(), c.biases.end());
  }
  for (const Case& c : x) {
    xq.insert(xq.end(), c.xq.begin(), c.xq.end());
    xs.insert(xs.end(), c.xs.begin(), c.xs.end());
    xsum.insert(xsum.end(), c.xsum.begin(), c.xsum.end());
  }
  float many[R * NW], alone[R * NW];
  dots_int16_rows<BITS, NW, R, G>(Row{packed.data(), scales.data(), biases.data()}, xq.data(), xs.data(), xsum.data(),
                                  K, many, NW);
  for (int o = 0; o < NW; ++o)
    dots_int16<BITS, R, G>(Row{w[o].w.data(), w[o].scales.data(), w[o].biases.data()}, xq.data(), xs.data(),
                           xsum.data(), K, alone + o, NW);
  ++cases;
  if (std::memcmp(many, alone, sizeof many) == 0)
    return 0;
  std::printf("FAIL %s int16 %d weight rows with %d rows of x at once: bits %d group %d K %d differ from one at a "
              "time\n",
              simd_name().c_str(), NW, R, BITS, G, K);
  return 1;
}
#endif

int main() {
  std::mt19937 rng(0);
  int failures = 0, cases = 0;
  for (int G : {32, 64, 128})
    for (int groups : {1, 2, 3, 8, 11})
      for (int repeat = 0; repeat < 4; ++repeat) {
        failures += check<8>(rng, G, G * groups, cases);
        failures += check<4>(rng, G, G * groups, cases);
#ifdef MK_DOTS_ROWS
        with_group(G, [&](auto g) {
          auto rows = [&](auto r) {
            failures += check_rows<8, g(), r()>(rng, G * groups, cases);
            failures += check_rows<4, g(), r()>(rng, G * groups, cases);
          };
          rows(std::integral_constant<int, 3>{}), rows(std::integral_constant<int, 4>{});
          rows(std::integral_constant<int, 5>{}), rows(std::integral_constant<int, 6>{});
        });
#endif
      }
  if (failures)
    return 1;
  std::printf("ok %d %s\n", cases, simd_name().c_str());
  return 0;
}
