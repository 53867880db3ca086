// Hot loops of childtune's strategies in one pass over memory (CPU, float32): Child-Tuning_F's per-step
// draw fused with what consumes it, ID3's ranking of the not-yet-chosen weights, and a Linear weight's
// gradient at its child elements only (`child_dot_`, at the end).
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

// ID3's candidates: the k best not-yet-chosen elements by H = |g| / (|w| + eps)^exp, exp 0 or 1 (where
// the float32 arithmetic is torch's exactly: x^1 = x, x^0 = 1), ties to the lower index, NaN ranked as
// +inf (torch.topk ranks NaN highest). One streaming pass: each thread keeps a heap of its k best over
// its share of the tensor, the heaps are merged at the end. Replaces score / masked_fill / topk passes.
struct Scored {
  float score;
  int64_t index;
};

inline bool better(const Scored& a, const Scored& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

std::vector<Scored> best_of(const float* g, const float* w, const bool* chosen, int64_t begin, int64_t end,
                            size_t k, float eps, bool divide) {
  std::vector<Scored> heap;  // the worst of the kept at the front (a max-heap under `better`)
  heap.reserve(k);
  float worst = -INFINITY;
  for (int64_t i = begin; i < end; ++i) {
    if (chosen[i]) continue;
    float s = std::fabs(g[i]);
    if (divide) s = s / (std::fabs(w[i]) + eps);
    if (std::isnan(s)) s = INFINITY;
    if (heap.size() < k) {
      heap.push_back({s, i});
      std::push_heap(heap.begin(), heap.end(), better);
      if (heap.size() == k) worst = heap.front().score;
    } else if (s > worst) {  // a tie never wins: its index is higher than every kept one's
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = {s, i};
      std::push_heap(heap.begin(), heap.end(), better);
      worst = heap.front().score;
    }
  }
  return heap;
}

std::tuple<torch::Tensor, torch::Tensor> top_unchosen(torch::Tensor grad, torch::Tensor weight, torch::Tensor chosen,
                                                      int64_t k, double eps, double exponent) {
  const int64_t n = weight.numel();
  TORCH_CHECK(grad.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "float32 needed");
  TORCH_CHECK(chosen.scalar_type() == torch::kBool, "chosen must be bool");
  TORCH_CHECK(exponent == 0.0 || exponent == 1.0, "exp must be 0 or 1");
  TORCH_CHECK(k >= 0, "k must be >= 0");
  check(grad, "grad", n);
  check(weight, "weight", n);
  check(chosen, "chosen", n);
  const float* g = grad.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const bool* c = chosen.data_ptr<bool>();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / GRAIN));
  std::vector<std::vector<Scored>> found(parts);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) {
      found[part] = best_of(g, w, c, n * part / parts, n * (part + 1) / parts, size_t(k), float(eps),
                            exponent == 1.0);
    }
  });
  std::vector<Scored> all;
  for (auto& f : found) all.insert(all.end(), f.begin(), f.end());
  const size_t keep = std::min(all.size(), size_t(k));
  std::partial_sort(all.begin(), all.begin() + keep, all.end(), better);
  auto values = torch::empty({int64_t(keep)}, torch::kFloat);
  auto indices = torch::empty({int64_t(keep)}, torch::kLong);
  float* v = values.data_ptr<float>();
  int64_t* ix = indices.data_ptr<int64_t>();
  for (size_t j = 0; j < keep; ++j) {
    v[j] = all[j].score;
    ix[j] = all[j].index;
  }
  return {values, indices};
}

// A Linear weight's gradient at its child elements only (childtune/optim/child_grad.py), a sampled
// dense-dense product (SDDMM): out[k] += sum_t rows[i_k, t] * cols[j_k, t], (i_k, j_k) = divmod(index[k], width),
// with rows = dY^T (out_features x tokens) and cols = X^T (in_features x tokens) of one block of tokens,
// made contiguous by the caller so each dot product reads two contiguous runs (the caller adds blocks). float32 or bfloat16 inputs, float32 sums in
// a fixed order (LANES partial sums, lane l taking tokens t = l mod LANES, then combined pairwise, then
// the tail): an element's value does not depend on the thread count. Sorted indices keep a row of dY^T
// in cache for all child elements of that weight row.
constexpr int LANES = 16;

inline float load(const float* p, int64_t t) { return p[t]; }

inline float load(const uint16_t* p, int64_t t) {  // bfloat16 is the top half of a float32
  const uint32_t bits = uint32_t(p[t]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

template <typename S>
inline float dot(const S* __restrict__ a, const S* __restrict__ b, int64_t n) {
  float acc[LANES] = {};
  int64_t t = 0;
  for (; t + LANES <= n; t += LANES) {
    for (int l = 0; l < LANES; ++l) acc[l] += load(a, t + l) * load(b, t + l);
  }
  for (int width = LANES / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  float tail = 0.0f;
  for (; t < n; ++t) tail += load(a, t) * load(b, t);
  return acc[0] + tail;
}

template <typename S, typename I>
inline void child_dot_range(const S* rows, const S* cols, const I* index, float* out, int64_t begin, int64_t end,
                            int64_t width, int64_t tokens) {
  for (int64_t k = begin; k < end; ++k) {
    const int64_t flat = int64_t(index[k]);
    out[k] += dot(rows + (flat / width) * tokens, cols + (flat % width) * tokens, tokens);
  }
}

#define CHILDTUNE_CHILD_DOT(NAME, S, I)                                                                      \
  CHILDTUNE_CLONES void NAME(const S* rows, const S* cols, const I* index, float* out, int64_t begin,       \
                             int64_t end, int64_t width, int64_t tokens) {                                 \
    child_dot_range(rows, cols, index, out, begin, end, width, tokens);                                     \
  }
CHILDTUNE_CHILD_DOT(child_dot_f32_i32, float, int32_t)
CHILDTUNE_CHILD_DOT(child_dot_f32_i64, float, int64_t)
CHILDTUNE_CHILD_DOT(child_dot_bf16_i32, uint16_t, int32_t)
CHILDTUNE_CHILD_DOT(child_dot_bf16_i64, uint16_t, int64_t)
#undef CHILDTUNE_CHILD_DOT

template <typename S, typename I>
void child_dot_run(void (*run)(const S*, const S*, const I*, float*, int64_t, int64_t, int64_t, int64_t),
                   const S* rows, const S* cols, const torch::Tensor& index, float* out, int64_t width,
                   int64_t tokens) {
  const I* ix = index.data_ptr<I>();
  const int64_t grain = std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, tokens));
  at::parallel_for(0, index.numel(), grain, [&](int64_t b, int64_t e) { run(rows, cols, ix, out, b, e, width, tokens); });
}

void child_dot_(torch::Tensor out, torch::Tensor rows, torch::Tensor cols, torch::Tensor index, int64_t width) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2 && rows.size(1) == cols.size(1), "rows and cols: (n, tokens) each");
  TORCH_CHECK(cols.size(0) == width, "cols must have `width` rows");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type() &&
              (rows.scalar_type() == torch::kFloat || rows.scalar_type() == torch::kBFloat16),
              "rows and cols must both be float32 or both bfloat16");
  TORCH_CHECK(index.scalar_type() == torch::kInt || index.scalar_type() == torch::kLong, "index must be int32 or int64");
  check(rows, "rows", rows.numel());
  check(cols, "cols", cols.numel());
  check(index, "index", index.numel());
  TORCH_CHECK(out.scalar_type() == torch::kFloat, "out must be float32");
  check(out, "out", index.numel());
  const int64_t n = index.numel(), tokens = rows.size(1);
  if (n == 0) return;
  const auto first = index[0].item<int64_t>(), last = index[n - 1].item<int64_t>();
  TORCH_CHECK(first >= 0 && last < rows.size(0) * width && first <= last, "index must be sorted flat indices into a (",
              rows.size(0), ", ", width, ") weight");
  float* o = out.data_ptr<float>();
  const bool wide = index.scalar_type() == torch::kLong;
  if (rows.scalar_type() == torch::kFloat) {
    const float *r = rows.data_ptr<float>(), *c = cols.data_ptr<float>();
    wide ? child_dot_run<float, int64_t>(child_dot_f32_i64, r, c, index, o, width, tokens)
         : child_dot_run<float, int32_t>(child_dot_f32_i32, r, c, index, o, width, tokens);
  } else {
    const auto* r = reinterpret_cast<const uint16_t*>(rows.data_ptr<at::BFloat16>());
    const auto* c = reinterpret_cast<const uint16_t*>(cols.data_ptr<at::BFloat16>());
    wide ? child_dot_run<uint16_t, int64_t>(child_dot_bf16_i64, r, c, index, o, width, tokens)
         : child_dot_run<uint16_t, int32_t>(child_dot_bf16_i32, r, c, index, o, width, tokens);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("keep", &keep, "out <- the draw's keep mask");
  module.def("mask_", &mask_, "grad <- keep ? grad * scale : 0");
  module.def("top_unchosen", &top_unchosen, "ID3: the k best not-yet-chosen elements by |g| / (|w| + eps)^exp");
  module.def("child_dot_", &child_dot_, "out[k] += sum_t rows[index[k] / width, t] * cols[index[k] % width, t]");
  module.def("adamw_", &adamw_, "one AdamW step of param on the (masked, if `masked`) gradient, in one pass");
}
