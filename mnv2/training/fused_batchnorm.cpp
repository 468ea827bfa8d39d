// Training-mode BatchNorm, optionally followed by ReLU6, over a channels_last float32 tensor seen as
// rows of C channels ([N*H*W, C]). Built and loaded by fused_batchnorm.py.
//
// Forward: one pass sums x and x^2 per channel, one pass writes clamp(x * scale + shift).
// Backward: one pass sums the gradient and gradient * (x - mean) per channel, one pass writes dx. The
// ReLU6 mask is recomputed from x with the forward's own expression, so no activation is stored twice.
// PyTorch's eager layers make about twice as many passes over memory, and memory is the bottleneck here.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kGrainElements = 1 << 15;  // per parallel task
constexpr int64_t kBlockRows = 64;           // rows summed in float before the running double sums

int64_t grain_rows(int64_t C) { return std::max<int64_t>(1, kGrainElements / C); }

// The pre-activation y = x * scale[c] + shift[c]; forward and backward compute it identically.
struct Affine {
  std::vector<float> scale, shift;
  Affine(const float* weight, const float* bias, const float* mean, const float* invstd, int64_t C)
      : scale(C), shift(C) {
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = weight[c] * invstd[c];
      shift[c] = bias[c] - mean[c] * scale[c];
    }
  }
};

// Per-channel sums over all rows of two quantities that `add_row(i, s1, s2)` adds for row i.
// Each thread sums blocks of rows in float, then adds each block to double totals: fast, and exact
// enough for the ~10^6 rows of a batch.
template <typename AddRow>
void column_sums(int64_t M, int64_t C, std::vector<double>& s1, std::vector<double>& s2, const AddRow& add_row) {
  const int threads = at::get_num_threads();
  std::vector<double> partial(2 * threads * C, 0.0);
  at::parallel_for(0, M, grain_rows(C), [&](int64_t begin, int64_t end) {
    double* p1 = partial.data() + 2 * C * at::get_thread_num();
    double* p2 = p1 + C;
    std::vector<float> b1(C), b2(C);
    for (int64_t i0 = begin; i0 < end; i0 += kBlockRows) {
      std::fill(b1.begin(), b1.end(), 0.f);
      std::fill(b2.begin(), b2.end(), 0.f);
      for (int64_t i = i0; i < std::min(end, i0 + kBlockRows); ++i) add_row(i, b1.data(), b2.data());
      for (int64_t c = 0; c < C; ++c) {
        p1[c] += b1[c];
        p2[c] += b2[c];
      }
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += partial[2 * C * t + c];
      s2[c] += partial[2 * C * t + C + c];
    }
  }
}

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

void check_rows(const at::Tensor& t, const char* name) {
  check(t, name);
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), name,
              " must be a channels_last (N, C, H, W) tensor");
}

}  // namespace

// Returns (output, batch mean, 1 / sqrt(batch variance + eps)); updates the running statistics in place
// as nn.BatchNorm2d does (the running variance is the unbiased one).
std::vector<at::Tensor> forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                at::Tensor running_mean, at::Tensor running_var, double momentum, double eps,
                                bool relu6) {
  check_rows(input, "input");
  check(weight, "weight");
  check(bias, "bias");
  check(running_mean, "running_mean");
  check(running_var, "running_var");
  const int64_t C = input.size(1), M = input.numel() / C;
  TORCH_CHECK(M > 1, "BatchNorm needs more than one value per channel while training");
  const float* x = input.data_ptr<float>();

  std::vector<double> sum, sum_sq;
  column_sums(M, C, sum, sum_sq, [&](int64_t i, float* __restrict__ s, float* __restrict__ q) {
    const float* __restrict__ row = x + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const float v = row[c];
      s[c] += v;
      q[c] += v * v;
    }
  });

  at::Tensor mean_t = at::empty({C}, input.options()), invstd_t = at::empty({C}, input.options());
  float* mean = mean_t.data_ptr<float>();
  float* invstd = invstd_t.data_ptr<float>();
  float* rm = running_mean.data_ptr<float>();
  float* rv = running_var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    const double m = sum[c] / M, var = std::max(sum_sq[c] / M - m * m, 0.0);
    mean[c] = static_cast<float>(m);
    invstd[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
    rm[c] = static_cast<float>((1 - momentum) * rm[c] + momentum * m);
    rv[c] = static_cast<float>((1 - momentum) * rv[c] + momentum * var * M / (M - 1));
  }

  const Affine a(weight.data_ptr<float>(), bias.data_ptr<float>(), mean, invstd, C);
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  const float lo = relu6 ? 0.f : -INFINITY, hi = relu6 ? 6.f : INFINITY;
  at::Tensor out_t = at::empty_like(input);
  float* out = out_t.data_ptr<float>();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict__ row = x + i * C;
      float* __restrict__ o = out + i * C;
      for (int64_t c = 0; c < C; ++c) o[c] = std::min(std::max(row[c] * scale[c] + shift[c], lo), hi);
    }
  });
  return {out_t, mean_t, invstd_t};
}

// Returns (grad_input, grad_weight, grad_bias) from the forward's input, mean and invstd.
std::vector<at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
                                 const at::Tensor& bias, const at::Tensor& mean_t, const at::Tensor& invstd_t,
                                 bool relu6) {
  check_rows(input, "input");
  check_rows(grad_output, "grad_output");
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output and input differ in shape");
  const int64_t C = input.size(1), M = input.numel() / C;
  const float* x = input.data_ptr<float>();
  const float* g = grad_output.data_ptr<float>();
  const float* mean = mean_t.data_ptr<float>();
  const float* invstd = invstd_t.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const Affine a(w, bias.data_ptr<float>(), mean, invstd, C);
  const float* scale = a.scale.data();
  const float* shift = a.shift.data();
  const float lo = relu6 ? 0.f : -INFINITY, hi = relu6 ? 6.f : INFINITY;

  // ReLU6 passes the gradient where its input lay strictly inside (0, 6), as torch's hardtanh does.
  std::vector<double> sum_g, sum_gx;
  column_sums(M, C, sum_g, sum_gx, [&](int64_t i, float* __restrict__ s, float* __restrict__ q) {
    const float* __restrict__ row = x + i * C;
    const float* __restrict__ gr = g + i * C;
    for (int64_t c = 0; c < C; ++c) {
      const float y = row[c] * scale[c] + shift[c], gv = gr[c];
      const float gm = ((y > lo) & (y < hi)) ? gv : 0.f;
      s[c] += gm;
      q[c] += gm * (row[c] - mean[c]);
    }
  });

  // dx = w * invstd * (g - sum_g / M - (x - mean) * invstd^2 * sum_gx / M) = k1 * g + k2 * x + k3
  at::Tensor grad_weight = at::empty({C}, weight.options()), grad_bias = at::empty({C}, weight.options());
  std::vector<float> k1(C), k2(C), k3(C);
  for (int64_t c = 0; c < C; ++c) {
    grad_weight.data_ptr<float>()[c] = static_cast<float>(sum_gx[c] * invstd[c]);
    grad_bias.data_ptr<float>()[c] = static_cast<float>(sum_g[c]);
    const double wi = static_cast<double>(w[c]) * invstd[c];
    const double q = -wi * invstd[c] * invstd[c] * sum_gx[c] / M;
    k1[c] = static_cast<float>(wi);
    k2[c] = static_cast<float>(q);
    k3[c] = static_cast<float>(-wi * sum_g[c] / M - q * mean[c]);
  }
  const float *K1 = k1.data(), *K2 = k2.data(), *K3 = k3.data();
  at::Tensor dx_t = at::empty_like(input);
  float* dx = dx_t.data_ptr<float>();
  at::parallel_for(0, M, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* __restrict__ row = x + i * C;
      const float* __restrict__ gr = g + i * C;
      float* __restrict__ d = dx + i * C;
      for (int64_t c = 0; c < C; ++c) {
        const float y = row[c] * scale[c] + shift[c], gv = gr[c];
        const float gm = ((y > lo) & (y < hi)) ? gv : 0.f;
        d[c] = K1[c] * gm + K2[c] * row[c] + K3[c];
      }
    }
  });
  return {dx_t, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "BatchNorm (+ ReLU6) training forward, channels_last float32");
  m.def("backward", &backward, "its backward");
}
