// Child-Tuning_F's per-step draw, fused with what consumes it, in one pass over memory (CPU, float32).
//
// The draw is defined in childtune/kernels.py (`keep_bits`, the eager reference these loops must equal
// bit for bit): element i of a parameter is kept iff hash(i) < threshold, with hash the 32-bit
// xor-shift-multiply mixer keyed by (k1, k2). It is a function of the position alone, so any block of
// any parameter can be drawn on any thread, rank or shard without generator state, in registers.
//
// Three consumers: the bool mask itself, the masked gradient (g <- keep ? g * scale : 0), and a whole
// AdamW update on the masked gradient (torch's fused CPU AdamW formula, aten FusedAdamKernel.cpp) that
// never writes the masked gradient out: one read of p, g, m, v and one write of p, m, v per element.
// Work is split with ATen's thread pool (torch.get_num_threads()); the inner loops are plain C++ the
// compiler vectorises, built for AVX-512, AVX2 and baseline x86 with dispatch at load time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t GRAIN = 1 << 15;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CHILDTUNE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CHILDTUNE_CLONES
#endif

inline uint32_t mix(uint32_t x, uint32_t k1, uint32_t k2) {
  x ^= k1;
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= k2;
  x ^= x >> 15;
  x *= 0x735a2d97u;
  x ^= x >> 15;
  return x;
}

struct Key {
  uint32_t start, k1, k2, threshold;  // element i is kept iff mix(start + i) < threshold
};

Key key_of(int64_t start, int64_t k1, int64_t k2, int64_t threshold) {
  TORCH_CHECK(start >= 0 && start < (int64_t(1) << 32), "start out of range");
  TORCH_CHECK(threshold >= 0 && threshold < (int64_t(1) << 32), "threshold out of range");
  return {uint32_t(start), uint32_t(k1), uint32_t(k2), uint32_t(threshold)};
}

void check(const torch::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == n, name,
              ": a contiguous CPU tensor of ", n, " elements is needed");
}

CHILDTUNE_CLONES void keep_block(bool* __restrict__ out, int64_t begin, int64_t end, Key k) {
  for (int64_t i = begin; i < end; ++i) out[i] = mix(k.start + uint32_t(i), k.k1, k.k2) < k.threshold;
}

CHILDTUNE_CLONES void mask_block(float* __restrict__ g, int64_t begin, int64_t end, Key k, float scale) {
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = mix(k.start + uint32_t(i), k.k1, k.k2) < k.threshold;
    g[i] *= keep ? scale : 0.0f;  // the bits of torch's g * mask * scale, NaN * 0 included
  }
}

struct Adam {
  float lr, beta1, beta2, eps, decay, step_size, bias2_sqrt;  // decay = 1 - lr * weight_decay
};

template <bool MASKED>
CHILDTUNE_CLONES void adamw_block(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                  float* __restrict__ v, int64_t begin, int64_t end,
                                  Key k, float scale, Adam a) {
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = !MASKED || mix(k.start + uint32_t(i), k.k1, k.k2) < k.threshold;
    const float grad = g[i] * (keep ? scale : 0.0f);
    float param = p[i] * a.decay;
    const float exp_avg = m[i] + (1.0f - a.beta1) * (grad - m[i]);
    const float exp_avg_sq = v[i] * a.beta2 + (1.0f - a.beta2) * grad * grad;
    const float denom = std::sqrt(exp_avg_sq) / a.bias2_sqrt + a.eps;
    param -= a.step_size * exp_avg / denom;
    p[i] = param;
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

void keep(torch::Tensor out, int64_t start, int64_t k1, int64_t k2, int64_t threshold) {
  TORCH_CHECK(out.scalar_type() == torch::kBool, "out must be bool");
  check(out, "out", out.numel());
  const Key k = key_of(start, k1, k2, threshold);
  bool* data = out.data_ptr<bool>();
  at::parallel_for(0, out.numel(), GRAIN, [&](int64_t b, int64_t e) { keep_block(data, b, e, k); });
}

void mask_(torch::Tensor grad, int64_t start, int64_t k1, int64_t k2, int64_t threshold, double scale) {
  TORCH_CHECK(grad.scalar_type() == torch::kFloat, "grad must be float32");
  check(grad, "grad", grad.numel());
  const Key k = key_of(start, k1, k2, threshold);
  float* data = grad.data_ptr<float>();
  const float s = float(scale);
  at::parallel_for(0, grad.numel(), GRAIN, [&](int64_t b, int64_t e) { mask_block(data, b, e, k, s); });
}

void adamw_(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
            int64_t start, int64_t k1, int64_t k2, int64_t threshold, double scale, double lr, double beta1,
            double beta2, double eps, double weight_decay, double step, bool masked) {
  const int64_t n = param.numel();
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat, "adamw_ takes float32 tensors");
    check(*t, "adamw_ argument", n);
  }
  const Key k = key_of(start, k1, k2, threshold);
  // the scalars as torch's fused kernel forms them: in double, then used in float32 arithmetic
  const Adam a{float(lr), float(beta1), float(beta2), float(eps), float(1.0 - lr * weight_decay),
               float(lr / (1.0 - std::pow(beta1, step))), float(std::sqrt(1.0 - std::pow(beta2, step)))};
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float s = float(scale);
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    if (masked) {
      adamw_block<true>(p, g, m, v, b, e, k, s, a);
    } else {
      adamw_block<false>(p, g, m, v, b, e, k, s, a);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("keep", &keep, "out <- the draw's keep mask");
  module.def("mask_", &mask_, "grad <- keep ? grad * scale : 0");
  module.def("adamw_", &adamw_, "one AdamW step of param on the (masked, if `masked`) gradient, in one pass");
}
