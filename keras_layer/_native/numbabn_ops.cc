// numbabn's TensorFlow ops: batch normalization on buffers TensorFlow allocates, computed
// by numbabn's Numba-compiled C entry points (numbabn/_kernels_cpu.py, c_entry_points).
//
// Why an op and not tf.numpy_function: a numpy_function call takes the GIL, runs Python
// and hands TensorFlow an array it did not allocate (fresh pages on every call). Here a
// call is a few C++ lines around calls of compiled functions: outputs come from
// TensorFlow's allocator (reused memory), an output may take over its input's buffer
// when nothing else reads it, and no Python runs.
//
// The entry points' addresses are handed over by keras_layer/_native (numbabn_set_entry).
// They are numbabn's whole operations taken apart (see "C entry points" in
// numbabn/_kernels_cpu.py): each pass split into the tasks of its Numba prange loop,
// the split fixed by the shape. The op runs a pass's tasks on TensorFlow's intra-op
// thread pool (RunTasks; inputs under numbabn.config.SERIAL_BELOW elements on the
// calling thread) and merges the partial results in task order in one call: the NumPy
// API's bits on any number of threads. Numba's own thread pool is never used here: a
// second pool on the cores TensorFlow's pool had just used (its threads still spinning),
// it cost MobileNetV2's BN ops 61 ms of a training step against 48 ms on TensorFlow's
// pool (2026-12-01, 2 cores, both timed in one process).
// Per-channel vectors are converted to float64 here: the entry points take float64.
// float16 (Eigen::half) and bfloat16 tensors go to the entry points compiled on their
// 16-bit patterns (c_entry_points("uint16") / ("int16"): the same 2-byte elements, read
// and written in their own format, float64 arithmetic inside); under Keras's
// mixed_float16 / mixed_bfloat16 policies their parameters are float32.
//
// Full-size outputs: an output takes over its input's buffer when TensorFlow allows it
// (nothing else reads the input); otherwise, at 256 KiB and more, it comes from numbabn's
// pool of reused buffers (numbabn/_native/buffer_pool.h), returned to the pool by the
// TensorBuffer's destructor when TensorFlow drops the last reference: TensorFlow's CPU
// allocator hands out fresh pages for every large tensor.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "buffer_pool.h"
#include "entry_points.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tsl/platform/threadpool.h"
// The profiler's TraceMe where this TensorFlow ships it (2.13 and later); without it the
// op still builds, untraced.
#if defined(__has_include)
#if __has_include("tsl/profiler/lib/traceme.h")
#include "tsl/profiler/lib/traceme.h"
#define NUMBABN_TRACEME 1
#endif
#endif

namespace {

using numbabn::BufferPool;
using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;
namespace shape_inference = tensorflow::shape_inference;

// numbabn_set_entry's table (numbabn/_native/entry_points.h)
std::atomic<void*> g_entries[numbabn::kSlots];
std::atomic<int64_t> g_serial_below{1 << 19};
std::atomic<int64_t> g_lanes{64};

class PooledBuffer : public tensorflow::TensorBuffer {
 public:
  PooledBuffer(void* data, size_t bytes) : TensorBuffer(data), bytes_(bytes) {}
  size_t size() const override { return bytes_; }
  TensorBuffer* root_buffer() override { return this; }
  void FillAllocationDescription(tensorflow::AllocationDescription* proto) const override {
    proto->set_requested_bytes(bytes_);
    proto->set_allocator_name("numbabn_pool");
  }

 private:
  ~PooledBuffer() override { BufferPool::Get().Release(data(), bytes_); }
  size_t bytes_;
};

// Output `index`, of `like`'s dtype and shape: input `input`'s own buffer if TensorFlow
// lets the op take it over, else a pooled buffer (large) or TensorFlow's allocator.
Status FullSizeOutput(OpKernelContext* ctx, int input, int index, const Tensor& like,
                      Tensor** out) {
  if (ctx->forward_input_to_output_with_shape(input, index, like.shape(), out)) {
    return Status();
  }
  const size_t bytes = like.TotalBytes();
  if (bytes < BufferPool::kMinBytes) return ctx->allocate_output(index, like.shape(), out);
  void* data = BufferPool::Get().Acquire(bytes);
  if (data == nullptr) return errors::ResourceExhausted("numbabn: out of memory");
  auto* buffer = new PooledBuffer(data, bytes);
  ctx->set_output(index, Tensor(like.dtype(), like.shape(), buffer));
  buffer->Unref();  // the output tensor holds its own reference
  *out = ctx->mutable_output(index);
  return Status();
}

struct Blocks {
  int64_t outer = 1, channels = 0, inner = 1;
  int64_t count() const { return outer * inner; }
};

Status BlocksOf(const TensorShape& shape, int axis, Blocks* b) {
  if (axis < 0 || axis >= shape.dims()) {
    return errors::InvalidArgument("numbabn: axis ", axis, " is out of range for an input of ",
                                   shape.dims(), " dimensions (shape ", shape.DebugString(),
                                   ")");
  }
  for (int a = 0; a < axis; ++a) b->outer *= shape.dim_size(a);
  b->channels = shape.dim_size(axis);
  for (int a = axis + 1; a < shape.dims(); ++a) b->inner *= shape.dim_size(a);
  return Status();
}

// A per-channel input as float64. gamma and beta may be empty, meaning absent (Keras's
// scale=False / center=False): 1 and 0.
template <typename P>
Status ChannelVector(const Tensor& t, const char* name, int64_t channels,
                     std::vector<double>* out, bool optional = false, double absent = 0.0) {
  if (optional && t.NumElements() == 0) {
    out->assign(channels, absent);
    return Status();
  }
  if (t.dims() != 1 || t.NumElements() != channels) {
    return errors::InvalidArgument("numbabn: ", name, " must have shape (", channels,
                                   ",), one value per channel; got shape ",
                                   t.shape().DebugString());
  }
  auto v = t.flat<P>();
  out->resize(channels);
  for (int64_t c = 0; c < channels; ++c) (*out)[c] = static_cast<double>(v(c));
  return Status();
}

Status Float64Vector(const Tensor& t, const char* name, int64_t channels) {
  if (t.dims() != 1 || t.NumElements() != channels) {
    return errors::InvalidArgument("numbabn: ", name, " must have shape (", channels,
                                   ",); got shape ", t.shape().DebugString());
  }
  return Status();
}

// The element type's index among the entry point sets.
template <typename T> struct ElementIndex;
template <> struct ElementIndex<float> { static constexpr int kValue = 0; };
template <> struct ElementIndex<double> { static constexpr int kValue = 1; };
template <> struct ElementIndex<Eigen::half> { static constexpr int kValue = 2; };
template <> struct ElementIndex<Eigen::bfloat16> { static constexpr int kValue = 3; };

template <typename T>
Status GetEntries(numbabn::Entries* e) {
  *e = numbabn::EntriesAt(g_entries, ElementIndex<T>::kValue);
  if (!e->Complete()) {
    return errors::FailedPrecondition(
        "numbabn's TensorFlow op has no entry points for this dtype yet; load it through "
        "keras_layer._native.load(), and call keras_layer._native.ensure(dtype) before "
        "running a restored graph of float64, float16 or bfloat16 ops (float32 is ready "
        "at load)");
  }
  return Status();
}

// Uninitialized float64 scratch: partial results and per-channel coefficients.
using Scratch = std::unique_ptr<double[]>;
Scratch NewScratch(int64_t n) { return Scratch(new double[std::max<int64_t>(n, 1)]); }

// Runs fn(t0, t1) over the tasks [0, n) of a pass over `elements` elements: on the
// calling thread below numbabn.config.SERIAL_BELOW elements (waking a thread costs more
// than it saves there), else on TensorFlow's intra-op thread pool (the pool TensorFlow's
// own CPU kernels use, sized by tf.config.threading), in shards of whole tasks. Each task
// writes its own partial result or elements, and the partial results are merged in task
// order afterwards: the same bits however the tasks are shared out.
void RunTasks(OpKernelContext* ctx, int64_t elements, int64_t n,
              const std::function<void(int64_t, int64_t)>& fn) {
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  if (n <= 1 || elements < g_serial_below.load() || workers->num_threads <= 1) {
    fn(0, n);
    return;
  }
  // ~4 shards per thread: a thread still busy with another op's work does not hold the
  // pass up, and a shard (tens of tasks of >= 32768 elements) dwarfs its scheduling
  const int64_t block = std::max<int64_t>(1, n / (4 * int64_t{workers->num_threads}));
  workers->workers->ParallelFor(n, tsl::thread::ThreadPool::SchedulingParams::Fixed(block),
                                fn);
}

// What the three ops share: the channel axis attribute, and running inline.
class NumbabnOp : public OpKernel {
 public:
  explicit NumbabnOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
  }

  // Run on the executor's own thread: handing the op to the inter-op pool costs a
  // thread switch per call; the op hands its large passes to the intra-op pool itself.
  bool IsExpensive() override { return false; }

 protected:
  // TensorFlow's executor traces inline ("inexpensive") ops only at the profiler's
  // verbose level, so without this a model's trace (TensorBoard's profiler, the default
  // host_tracer_level) would not show where numbabn's time goes. Costs one atomic load
  // when no profiler runs.
#ifdef NUMBABN_TRACEME
  tsl::profiler::TraceMe Trace() const {
    return tsl::profiler::TraceMe(
        [this] { return tsl::profiler::TraceMeOp(name_view(), type_string_view()); });
  }
#else
  int Trace() const { return 0; }
#endif

  int axis_;
};

template <typename T, typename P>
class TrainOp : public NumbabnOp {
 public:
  using NumbabnOp::NumbabnOp;

  void Compute(OpKernelContext* ctx) override {
    [[maybe_unused]] const auto trace = Trace();
    const Tensor& x = ctx->input(0);
    const double eps = ctx->input(3).scalar<double>()();
    Blocks b;
    OP_REQUIRES_OK(ctx, BlocksOf(x.shape(), axis_, &b));
    OP_REQUIRES(ctx, b.channels > 0 && b.count() > 0,
                errors::InvalidArgument("numbabn: empty batch: x has shape ",
                                        x.shape().DebugString(), ", so each of its ",
                                        b.channels, " channels (axis ", axis_,
                                        ") has no elements"));
    std::vector<double> gamma, beta;
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(1), "gamma", b.channels, &gamma, true, 1.0));
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(2), "beta", b.channels, &beta, true, 0.0));
    numbabn::Entries e;
    OP_REQUIRES_OK(ctx, GetEntries<T>(&e));

    Tensor *y, *mean, *var, *invstd;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &y));
    const TensorShape cs({b.channels});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, cs, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, cs, &var));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, cs, &invstd));
    const int64_t C = b.channels, n = x.NumElements();
    int64_t sizes[3];
    e.plan(b.outer, C, b.inner, sizes);
    const int64_t parts = sizes[1];
    Scratch counts = NewScratch(parts), pmean = NewScratch(parts * C),
            pm2 = NewScratch(parts * C), scale = NewScratch(C);
    const T* xp = x.flat<T>().data();
    T* yp = y->flat<T>().data();
    double* m = mean->flat<double>().data();
    double* v = var->flat<double>().data();
    if (numbabn::ShortRuns(b.inner, g_lanes.load())) {  // channels-first maps under 8x8
      e.stats_short(xp, b.outer, C, b.inner, m, v);
      e.norm_coeffs(v, C, eps, gamma.data(), invstd->flat<double>().data(), scale.get());
    } else {
      RunTasks(ctx, n, sizes[0], [&](int64_t t0, int64_t t1) {
        e.stats(xp, b.outer, C, b.inner, t0, t1, counts.get(), pmean.get(), pm2.get());
      });
      e.train_coeffs(counts.get(), pmean.get(), pm2.get(), parts, C, gamma.data(), eps, m, v,
                     invstd->flat<double>().data(), scale.get());
    }
    RunTasks(ctx, n, sizes[2], [&](int64_t t0, int64_t t1) {
      e.affine(xp, yp, b.outer, C, b.inner, t0, t1, m, scale.get(), beta.data());
    });
  }
};

template <typename T, typename P>
class InferenceOp : public NumbabnOp {
 public:
  using NumbabnOp::NumbabnOp;

  void Compute(OpKernelContext* ctx) override {
    [[maybe_unused]] const auto trace = Trace();
    const Tensor& x = ctx->input(0);
    const double eps = ctx->input(5).scalar<double>()();
    Blocks b;
    OP_REQUIRES_OK(ctx, BlocksOf(x.shape(), axis_, &b));
    std::vector<double> gamma, beta, mm, mv;
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(1), "gamma", b.channels, &gamma, true, 1.0));
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(2), "beta", b.channels, &beta, true, 0.0));
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(3), "moving_mean", b.channels, &mm));
    OP_REQUIRES_OK(ctx,
                   ChannelVector<P>(ctx->input(4), "moving_variance", b.channels, &mv));
    numbabn::Entries e;
    OP_REQUIRES_OK(ctx, GetEntries<T>(&e));

    Tensor* y;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &y));
    if (x.NumElements() == 0) return;  // an empty batch normalizes to itself
    const int64_t C = b.channels;
    int64_t sizes[3];
    e.plan(b.outer, C, b.inner, sizes);
    Scratch invstd = NewScratch(C), scale = NewScratch(C);
    e.norm_coeffs(mv.data(), C, eps, gamma.data(), invstd.get(), scale.get());
    const T* xp = x.flat<T>().data();
    T* yp = y->flat<T>().data();
    RunTasks(ctx, x.NumElements(), sizes[2], [&](int64_t t0, int64_t t1) {
      e.affine(xp, yp, b.outer, C, b.inner, t0, t1, mm.data(), scale.get(), beta.data());
    });
  }
};

template <typename T, typename P>
class TrainGradOp : public NumbabnOp {
 public:
  using NumbabnOp::NumbabnOp;

  void Compute(OpKernelContext* ctx) override {
    [[maybe_unused]] const auto trace = Trace();
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                errors::InvalidArgument("numbabn: dy must have the shape of x, ",
                                        x.shape().DebugString(), "; got ",
                                        dy.shape().DebugString()));
    Blocks b;
    OP_REQUIRES_OK(ctx, BlocksOf(x.shape(), axis_, &b));
    OP_REQUIRES_OK(ctx, Float64Vector(ctx->input(2), "mean", b.channels));
    OP_REQUIRES_OK(ctx, Float64Vector(ctx->input(3), "invstd", b.channels));
    std::vector<double> gamma;
    OP_REQUIRES_OK(ctx, ChannelVector<P>(ctx->input(4), "gamma", b.channels, &gamma, true, 1.0));
    numbabn::Entries e;
    OP_REQUIRES_OK(ctx, GetEntries<T>(&e));

    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &dx));
    const TensorShape cs({b.channels});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, cs, &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, cs, &dbeta));
    const int64_t C = b.channels, n = x.NumElements();
    int64_t sizes[3];
    e.plan(b.outer, C, b.inner, sizes);
    const bool short_runs = numbabn::ShortRuns(b.inner, g_lanes.load());
    const int64_t parts = short_runs ? 1 : sizes[1];
    Scratch p1 = NewScratch(parts * C), p2 = NewScratch(parts * C), dg = NewScratch(C),
            db = NewScratch(C), k_dy = NewScratch(C), mean_dy = NewScratch(C),
            k_x = NewScratch(C);
    const T* dyp = dy.flat<T>().data();
    const T* xp = x.flat<T>().data();
    T* dxp = dx->flat<T>().data();
    const double* mean = ctx->input(2).flat<double>().data();
    if (short_runs) {  // the sums whole, one partial result
      e.grad_sums_short(dyp, xp, b.outer, C, b.inner, mean, p1.get(), p2.get());
    } else {
      RunTasks(ctx, n, sizes[0], [&](int64_t t0, int64_t t1) {
        e.grad_sums(dyp, xp, b.outer, C, b.inner, t0, t1, mean, p1.get(), p2.get());
      });
    }
    e.grad_coeffs(p1.get(), p2.get(), parts, C, b.count(), ctx->input(3).flat<double>().data(),
                  gamma.data(), dg.get(), db.get(), k_dy.get(), mean_dy.get(), k_x.get());
    RunTasks(ctx, n, sizes[2], [&](int64_t t0, int64_t t1) {
      e.grad_input(dyp, xp, dxp, b.outer, C, b.inner, t0, t1, mean, k_dy.get(),
                   mean_dy.get(), k_x.get());
    });
    auto g = dgamma->flat<P>();
    auto s = dbeta->flat<P>();
    for (int64_t c = 0; c < C; ++c) {
      g(c) = static_cast<P>(dg[c]);
      s(c) = static_cast<P>(db[c]);
    }
  }
};

// Output 0 has the shape of input ``like``; outputs 1..channel_outputs are (C,).
Status ShapeOf(shape_inference::InferenceContext* c, int like, int channel_outputs) {
  c->set_output(0, c->input(like));
  int axis;
  TF_RETURN_IF_ERROR(c->GetAttr("axis", &axis));
  shape_inference::DimensionHandle channels = c->UnknownDim();
  if (c->RankKnown(c->input(like)) && axis < c->Rank(c->input(like))) {
    channels = c->Dim(c->input(like), axis);
  }
  for (int i = 1; i <= channel_outputs; ++i) c->set_output(i, c->Vector(channels));
  return Status();
}

}  // namespace

extern "C" {
// Called from keras_layer/_native.py through ctypes before any op runs.
__attribute__((visibility("default"))) int numbabn_set_entry(int slot, void* fn) {
  if (slot < 0 || slot >= numbabn::kSlots) return -1;
  g_entries[slot].store(fn);
  return 0;
}
__attribute__((visibility("default"))) void numbabn_set_serial_below(int64_t n) {
  g_serial_below.store(n);
}
__attribute__((visibility("default"))) void numbabn_set_lanes(int64_t n) { g_lanes.store(n); }
// Bytes of free buffers the pool holds (tests check that memory stays bounded).
__attribute__((visibility("default"))) int64_t numbabn_pool_cached_bytes() {
  return static_cast<int64_t>(BufferPool::Get().cached_bytes());
}
}

REGISTER_OP("NumbabnTrain")
    .Input("x: T")
    .Input("gamma: P")
    .Input("beta: P")
    .Input("epsilon: double")
    .Output("y: T")
    .Output("mean: double")
    .Output("variance: double")
    .Output("invstd: double")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("P: {float, double}")
    .Attr("axis: int >= 0")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      return ShapeOf(c, 0, 3);
    })
    .Doc("Batch-statistics normalization by numbabn (an empty gamma/beta means 1/0).");

REGISTER_OP("NumbabnInference")
    .Input("x: T")
    .Input("gamma: P")
    .Input("beta: P")
    .Input("moving_mean: P")
    .Input("moving_variance: P")
    .Input("epsilon: double")
    .Output("y: T")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("P: {float, double}")
    .Attr("axis: int >= 0")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return ShapeOf(c, 0, 0); })
    .Doc("Moving-statistics normalization by numbabn.");

REGISTER_OP("NumbabnTrainGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: double")
    .Input("invstd: double")
    .Input("gamma: P")
    .Output("dx: T")
    .Output("dgamma: P")
    .Output("dbeta: P")
    .Attr("T: {half, bfloat16, float, double}")
    .Attr("P: {float, double}")
    .Attr("axis: int >= 0")
    .SetShapeFn([](shape_inference::InferenceContext* c) { return ShapeOf(c, 1, 2); })
    .Doc("Closed-form batch-norm backward by numbabn.");

#define NUMBABN_REGISTER(T, P)                                                          \
  REGISTER_KERNEL_BUILDER(Name("NumbabnTrain").Device(DEVICE_CPU).TypeConstraint<T>("T") \
                              .TypeConstraint<P>("P"), TrainOp<T, P>);                  \
  REGISTER_KERNEL_BUILDER(Name("NumbabnInference").Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T").TypeConstraint<P>("P"),            \
                          InferenceOp<T, P>);                                            \
  REGISTER_KERNEL_BUILDER(Name("NumbabnTrainGrad").Device(DEVICE_CPU)                    \
                              .TypeConstraint<T>("T").TypeConstraint<P>("P"),            \
                          TrainGradOp<T, P>);

NUMBABN_REGISTER(float, float)
NUMBABN_REGISTER(float, double)
NUMBABN_REGISTER(double, float)
NUMBABN_REGISTER(double, double)
NUMBABN_REGISTER(Eigen::half, float)
NUMBABN_REGISTER(Eigen::half, double)
NUMBABN_REGISTER(Eigen::bfloat16, float)
NUMBABN_REGISTER(Eigen::bfloat16, double)
