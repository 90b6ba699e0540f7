// numbabn's PyTorch op for CPU tensors: the module's whole eager forward (batch or
// running statistics, the running-statistics update) and its backward, with autograd,
// in one call from Python, computed by numbabn's Numba-compiled C entry points
// (numbabn/_kernels_cpu.py, "C entry points") on buffers PyTorch owns.
//
// Why: the Python path (numbabn/torch/_ops.py, _bridge.py) costs ~100 Python calls per
// module call (NumPy views of every tensor, the layout planning, Numba's dispatcher, a
// torch.autograd.Function), which after the model's other ops take 2-2.5x their time in
// a warm loop; and Numba's thread pool is a second OpenMP runtime beside PyTorch's on the
// same cores. Here a module call is one dispatcher call, the autograd node is a C++ one,
// and the tasks run on PyTorch's own pool (at::parallel_for), split by the shape alone
// and merged in task order: the NumPy API's bits on any number of threads.
//
// The entry points' addresses are handed over by numbabn/torch/_native through
// numbabn_torch_set_entry. Layouts: a dense tensor, contiguous or channels_last / channels_last_3d, is
// the (outer, C, inner) block the entry points take (channels last: rows (N*H*W, C));
// anything else is copied to contiguous first (the module sends such tensors down the
// Python path instead, which reads any strides in place). Full-size outputs have the
// input's strides; at 256 KiB and more their memory comes from numbabn's buffer pool
// (numbabn/_native/buffer_pool.h), returned when PyTorch frees the tensor.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "buffer_pool.h"
#include "entry_points.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// numbabn_torch_set_entry's table (numbabn/_native/entry_points.h)
std::atomic<void*> g_entries[numbabn::kSlots];
std::atomic<int64_t> g_serial_below{1 << 15};
std::atomic<int64_t> g_lanes{64};

using numbabn::Entries;

Entries EntriesFor(at::ScalarType dtype) {
  int index = 0;
  switch (dtype) {
    case at::kFloat: index = 0; break;
    case at::kDouble: index = 1; break;
    case at::kHalf: index = 2; break;
    case at::kBFloat16: index = 3; break;
    default:
      TORCH_CHECK(false, "numbabn.torch: no kernels for ", dtype,
                  " input (float16, bfloat16, float32 or float64)");
  }
  const Entries e = numbabn::EntriesAt(g_entries, index);
  TORCH_CHECK(e.Complete(),
              "numbabn.torch: the compiled op has no entry points for ", dtype,
              " yet (numbabn.torch._native.ensure registers them)");
  return e;
}

// ------------------------------------------------------------------------- layouts

// A tensor as the entry points see it: a dense buffer of (outer, C, inner).
struct Blocks {
  Tensor t;  // the tensor itself, or its contiguous copy
  int64_t outer = 1, channels = 0, inner = 1;
  int64_t count() const { return outer * inner; }
};

bool ChannelsLast(const Tensor& t) {
  return (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
         (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
}

Blocks BlocksOf(const Tensor& x) {
  Blocks b;
  b.channels = x.size(1);
  const int64_t n = x.numel();
  if (x.is_contiguous()) {
    b.t = x;
    b.outer = x.size(0);
    b.inner = n / (b.outer * b.channels);
  } else if (ChannelsLast(x)) {
    b.t = x;
    b.outer = n / b.channels;
  } else {
    b.t = x.contiguous();
    b.outer = x.size(0);
    b.inner = n / (b.outer * b.channels);
  }
  return b;
}

// `t` laid out as `like` (strides equal), copying only when they differ.
Tensor Like(const Tensor& t, const Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

// A full-size output with the strides of the dense tensor `like`: from the buffer pool
// at 256 KiB and more, else from PyTorch's allocator (which reuses its small blocks).
Tensor FullSizeOutput(const Tensor& like) {
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes < numbabn::BufferPool::kMinBytes) return at::empty_like(like);
  void* data = numbabn::BufferPool::Get().Acquire(bytes);
  TORCH_CHECK(data != nullptr, "numbabn.torch: out of memory (", bytes, " bytes)");
  return at::from_blob(
      data, like.sizes(), like.strides(),
      [bytes](void* p) { numbabn::BufferPool::Get().Release(p, bytes); },
      like.options());
}

// A per-channel tensor (or none: `absent`) as float64 values.
std::vector<double> ChannelValues(const std::optional<Tensor>& t, int64_t C, double absent) {
  std::vector<double> v(C, absent);
  if (!t.has_value() || !t->defined()) return v;
  const Tensor& s = *t;
  const int64_t stride = s.stride(0);
  switch (s.scalar_type()) {
    case at::kFloat: {
      const float* p = s.const_data_ptr<float>();
      for (int64_t c = 0; c < C; ++c) v[c] = p[c * stride];
      break;
    }
    case at::kDouble: {
      const double* p = s.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) v[c] = p[c * stride];
      break;
    }
    default: {  // float16 / bfloat16 parameters: exact in float64
      Tensor d = s.to(at::kDouble).contiguous();
      const double* p = d.const_data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) v[c] = p[c];
    }
  }
  return v;
}

Tensor Float64(std::vector<double>&& v) {
  auto* owned = new std::vector<double>(std::move(v));
  return at::from_blob(
      owned->data(), {static_cast<int64_t>(owned->size())},
      [owned](void*) { delete owned; }, at::TensorOptions().dtype(at::kDouble));
}

// Runs fn(t0, t1) over the tasks [0, n) of a pass over `elements` elements: on the
// calling thread below numbabn.config.TORCH_SERIAL_BELOW elements, else on PyTorch's
// intra-op pool. Each task writes its own
// partial result or elements; they are merged in task order afterwards.
void RunTasks(int64_t elements, int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 1 || elements < g_serial_below.load() || at::get_num_threads() <= 1 ||
      at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  at::parallel_for(0, n, 1, fn);
}

bool ShortRuns(const Blocks& b) { return numbabn::ShortRuns(b.inner, g_lanes.load()); }

// ----------------------------------------------------------------------- the passes

struct TrainResult {
  Tensor y;
  std::vector<double> mean, var, invstd;
};

TrainResult Train(const Blocks& b, const std::vector<double>& gamma,
                  const std::vector<double>& beta, double eps) {
  const Entries e = EntriesFor(b.t.scalar_type());
  const int64_t C = b.channels, n = b.t.numel();
  TrainResult r{FullSizeOutput(b.t), std::vector<double>(C), std::vector<double>(C),
                std::vector<double>(C)};
  std::vector<double> scale(C);
  int64_t sizes[3];
  e.plan(b.outer, C, b.inner, sizes);
  const void* xp = b.t.const_data_ptr();
  void* yp = r.y.mutable_data_ptr();
  if (ShortRuns(b)) {
    e.stats_short(xp, b.outer, C, b.inner, r.mean.data(), r.var.data());
    e.norm_coeffs(r.var.data(), C, eps, gamma.data(), r.invstd.data(), scale.data());
  } else {
    const int64_t parts = sizes[1];
    std::vector<double> counts(parts), pmean(parts * C), pm2(parts * C);
    RunTasks(n, sizes[0], [&](int64_t t0, int64_t t1) {
      e.stats(xp, b.outer, C, b.inner, t0, t1, counts.data(), pmean.data(), pm2.data());
    });
    e.train_coeffs(counts.data(), pmean.data(), pm2.data(), parts, C, gamma.data(), eps,
                   r.mean.data(), r.var.data(), r.invstd.data(), scale.data());
  }
  RunTasks(n, sizes[2], [&](int64_t t0, int64_t t1) {
    e.affine(xp, yp, b.outer, C, b.inner, t0, t1, r.mean.data(), scale.data(), beta.data());
  });
  return r;
}

Tensor Inference(const Blocks& b, const std::vector<double>& gamma,
                 const std::vector<double>& beta, const std::vector<double>& mean,
                 const std::vector<double>& var, double eps) {
  const Entries e = EntriesFor(b.t.scalar_type());
  const int64_t C = b.channels;
  Tensor y = FullSizeOutput(b.t);
  std::vector<double> invstd(C), scale(C);
  e.norm_coeffs(var.data(), C, eps, gamma.data(), invstd.data(), scale.data());
  int64_t sizes[3];
  e.plan(b.outer, C, b.inner, sizes);
  const void* xp = b.t.const_data_ptr();
  void* yp = y.mutable_data_ptr();
  RunTasks(b.t.numel(), sizes[2], [&](int64_t t0, int64_t t1) {
    e.affine(xp, yp, b.outer, C, b.inner, t0, t1, mean.data(), scale.data(), beta.data());
  });
  return y;
}

struct Grads {
  Tensor dx;  // undefined when not wanted
  std::vector<double> dgamma, dbeta;
};

// The closed-form backward with the batch's statistics (`training`), or with constant
// ones (the running statistics: dx = dy * gamma * invstd, the batch terms zero).
Grads Backward(const Tensor& dy_in, const Blocks& b, const std::vector<double>& gamma,
               const std::vector<double>& mean, const std::vector<double>& invstd,
               bool training, bool want_dx) {
  const Entries e = EntriesFor(b.t.scalar_type());
  const int64_t C = b.channels, n = b.t.numel();
  const Tensor dy = Like(dy_in.to(b.t.scalar_type()), b.t);
  const void* dyp = dy.const_data_ptr();
  const void* xp = b.t.const_data_ptr();
  Grads g{Tensor(), std::vector<double>(C), std::vector<double>(C)};
  int64_t sizes[3];
  e.plan(b.outer, C, b.inner, sizes);
  int64_t parts = sizes[1];
  std::vector<double> p1, p2;
  if (ShortRuns(b)) {
    parts = 1;
    p1.resize(C);
    p2.resize(C);
    e.grad_sums_short(dyp, xp, b.outer, C, b.inner, mean.data(), p1.data(), p2.data());
  } else {
    p1.resize(parts * C);
    p2.resize(parts * C);
    RunTasks(n, sizes[0], [&](int64_t t0, int64_t t1) {
      e.grad_sums(dyp, xp, b.outer, C, b.inner, t0, t1, mean.data(), p1.data(), p2.data());
    });
  }
  std::vector<double> k_dy(C), mean_dy(C), k_x(C);
  e.grad_coeffs(p1.data(), p2.data(), parts, C, b.count(), invstd.data(), gamma.data(),
                g.dgamma.data(), g.dbeta.data(), k_dy.data(), mean_dy.data(), k_x.data());
  if (!want_dx) return g;
  if (!training) {  // constant statistics: no batch terms
    std::fill(mean_dy.begin(), mean_dy.end(), 0.0);
    std::fill(k_x.begin(), k_x.end(), 0.0);
  }
  g.dx = FullSizeOutput(b.t);
  void* dxp = g.dx.mutable_data_ptr();
  RunTasks(n, sizes[2], [&](int64_t t0, int64_t t1) {
    e.grad_input(dyp, xp, dxp, b.outer, C, b.inner, t0, t1, mean.data(), k_dy.data(),
                 mean_dy.data(), k_x.data());
  });
  return g;
}

// --------------------------------------------------------------------------- autograd

void NoDoubleBackward() {
  // grad mode is on inside a backward only under create_graph=True: a request for
  // gradients of these gradients, which the closed-form kernels do not provide
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "numbabn.torch batch norm does not support double backward (create_graph=True "
              "through it): its backward is a fused kernel without a derivative. Use "
              "torch.nn.BatchNorm*d for higher-order gradients (numbabn.torch.convert(model, "
              "to='torch') swaps the modules back)");
}

// The gradients as the forward's inputs (`n_inputs` of them: none for the non-tensor
// ones): dx, and dweight/dbias in the parameters' dtypes (through a float64 tensor, as
// the Python path converts them), none where autograd wants none. (needs_input_grad
// counts the tensor inputs that were given: a missing weight shifts bias to edge 1.)
variable_list InputGrads(AutogradContext* ctx, Grads&& g, const Tensor& weight,
                         const Tensor& bias, size_t n_inputs) {
  variable_list out(n_inputs);
  out[0] = g.dx;
  const size_t bias_edge = weight.defined() ? 2 : 1;
  if (weight.defined() && ctx->needs_input_grad(1)) {
    out[1] = Float64(std::move(g.dgamma)).to(weight.scalar_type());
  }
  if (bias.defined() && ctx->needs_input_grad(bias_edge)) {
    out[2] = Float64(std::move(g.dbeta)).to(bias.scalar_type());
  }
  return out;
}

void UpdateRunning(Tensor& running, const std::vector<double>& batch, double factor,
                   double bessel) {
  // running = float64(running) * (1 - factor) + (batch * bessel) * factor, in the
  // order of numbabn/torch/modules.py's _moving_update (the same bits; no contraction)
  const double keep = 1.0 - factor;
  const int64_t C = static_cast<int64_t>(batch.size()), stride = running.stride(0);
  if (running.scalar_type() == at::kFloat) {
    float* p = running.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      p[c * stride] = static_cast<float>(static_cast<double>(p[c * stride]) * keep +
                                         (batch[c] * bessel) * factor);
    }
  } else if (running.scalar_type() == at::kDouble) {
    double* p = running.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      p[c * stride] = p[c * stride] * keep + (batch[c] * bessel) * factor;
    }
  } else {  // float16 / bfloat16 buffers: rounded by PyTorch's copy, as the Python path
    std::vector<double> v = ChannelValues(running, C, 0.0);
    for (int64_t c = 0; c < C; ++c) v[c] = v[c] * keep + (batch[c] * bessel) * factor;
    running.copy_(Float64(std::move(v)));
    return;  // copy_ bumped the version
  }
  running.unsafeGetTensorImpl()->bump_version();  // as an in-place torch op does
}

// The autograd nodes' names say numbabn: the profiler shows the backward as
// "torch::autograd::CppNode<(anonymous namespace)::NumbabnTrainFunction>", which is how
// benchmarks/_torch_common.bn_step_ms finds a BN layer's backward in a model's trace.
struct NumbabnTrainFunction : public torch::autograd::Function<NumbabnTrainFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        std::optional<Tensor> running_mean, std::optional<Tensor> running_var,
                        double factor, double eps) {
    const Blocks b = BlocksOf(x);
    const int64_t C = b.channels;
    const std::vector<double> gamma = ChannelValues(weight, C, 1.0);
    TrainResult r = Train(b, gamma, ChannelValues(bias, C, 0.0), eps);
    if (running_mean.has_value() && running_mean->defined()) {
      // the unbiased batch variance: var * count / (count - 1)
      const double count = static_cast<double>(b.count());
      UpdateRunning(*running_mean, r.mean, factor, 1.0);
      UpdateRunning(*running_var, r.var, factor, count / (count - 1.0));
    }
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor())});
    ctx->saved_data["mean"] = Float64(std::move(r.mean));
    ctx->saved_data["invstd"] = Float64(std::move(r.invstd));
    return r.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoDoubleBackward();
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const Blocks b = BlocksOf(x);
    const Tensor mean = ctx->saved_data["mean"].toTensor();
    const Tensor invstd = ctx->saved_data["invstd"].toTensor();
    const double* m = mean.const_data_ptr<double>();
    const double* s = invstd.const_data_ptr<double>();
    const int64_t C = b.channels;
    Grads g = Backward(grads[0], b, ChannelValues(weight, C, 1.0),
                       std::vector<double>(m, m + C), std::vector<double>(s, s + C), true,
                       ctx->needs_input_grad(0));
    return InputGrads(ctx, std::move(g), weight, bias, 7);
  }
};

struct NumbabnInferenceFunction : public torch::autograd::Function<NumbabnInferenceFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const Tensor& running_mean, const Tensor& running_var, double eps) {
    const Blocks b = BlocksOf(x);
    const int64_t C = b.channels;
    ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()),
                            running_mean, running_var});
    ctx->saved_data["eps"] = eps;
    return Inference(b, ChannelValues(weight, C, 1.0), ChannelValues(bias, C, 0.0),
                     ChannelValues(running_mean, C, 0.0), ChannelValues(running_var, C, 0.0),
                     eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    NoDoubleBackward();
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &weight = saved[1], &bias = saved[2];
    const Blocks b = BlocksOf(x);
    const int64_t C = b.channels;
    const double eps = ctx->saved_data["eps"].toDouble();
    std::vector<double> invstd = ChannelValues(saved[4], C, 0.0);
    for (double& v : invstd) v = 1.0 / std::sqrt(v + eps);
    Grads g = Backward(grads[0], b, ChannelValues(weight, C, 1.0),
                       ChannelValues(saved[3], C, 0.0), invstd, false,
                       ctx->needs_input_grad(0));
    return InputGrads(ctx, std::move(g), weight, bias, 6);
  }
};

// The checks the entry points rely on (the modules make them, with torch's messages,
// before they call the op; these keep a direct caller from reading out of bounds).
void CheckVector(const std::optional<Tensor>& t, const char* name, int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == C &&
                  at::isFloatingType(t->scalar_type()),
              "numbabn.torch: ", name, " must be a floating-point CPU tensor of shape (", C,
              ",), one value per channel; got ", t->scalar_type(), " ", t->sizes(), " on ",
              t->device());
}

void CheckArguments(const Tensor& x, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                    const std::optional<Tensor>& running_var) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() >= 2 && x.numel() > 0,
              "numbabn.torch: input must be a non-empty CPU tensor (N, C, ...); got ",
              x.sizes(), " on ", x.device());
  const int64_t C = x.size(1);
  CheckVector(weight, "weight", C);
  CheckVector(bias, "bias", C);
  CheckVector(running_mean, "running_mean", C);
  CheckVector(running_var, "running_var", C);
}

// The module's eager forward: batch statistics (`training`; the running statistics, when
// given, updated with weight `factor`) or the running ones.
Tensor BatchNorm(const Tensor& x, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                 const std::optional<Tensor>& running_var, bool training, double factor,
                 double eps) {
  CheckArguments(x, weight, bias, running_mean, running_var);
  if (training) {
    TORCH_CHECK(running_mean.has_value() == running_var.has_value(),
                "numbabn.torch: running_mean and running_var must be given together");
    return NumbabnTrainFunction::apply(x, weight, bias, running_mean, running_var, factor, eps);
  }
  TORCH_CHECK(running_mean.has_value() && running_mean->defined(),
              "running_mean must be defined in evaluation mode");
  TORCH_CHECK(running_var.has_value() && running_var->defined(),
              "running_var must be defined in evaluation mode");
  return NumbabnInferenceFunction::apply(x, weight, bias, *running_mean, *running_var, eps);
}

}  // namespace

extern "C" {
// Called from numbabn/torch/_native.py through ctypes before any op runs.
__attribute__((visibility("default"))) int numbabn_torch_set_entry(int slot, void* fn) {
  if (slot < 0 || slot >= numbabn::kSlots) return -1;
  g_entries[slot].store(fn);
  return 0;
}
__attribute__((visibility("default"))) void numbabn_torch_set_config(int64_t serial_below,
                                                                     int64_t lanes) {
  g_serial_below.store(serial_below);
  g_lanes.store(lanes);
}
// Bytes of free buffers the pool holds (tests check that memory stays bounded).
__attribute__((visibility("default"))) int64_t numbabn_torch_pool_cached_bytes() {
  return static_cast<int64_t>(numbabn::BufferPool::Get().cached_bytes());
}
}

TORCH_LIBRARY(numbabn_native, m) {
  m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, bool training, float factor, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(numbabn_native, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &BatchNorm);
}
