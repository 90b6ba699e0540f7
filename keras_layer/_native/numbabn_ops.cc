// numbabn's TensorFlow ops: batch normalization on buffers TensorFlow allocates, computed
// by numbabn's Numba-compiled C entry points (numbabn/_kernels_cpu.py, c_entry_points).
//
// Why an op and not tf.numpy_function: a numpy_function call takes the GIL, runs Python
// and hands TensorFlow an array it did not allocate (fresh pages on every call). Here a
// call is a few C++ lines around one call of a compiled function: outputs come from
// TensorFlow's allocator (reused memory), an output may take over its input's buffer
// when nothing else reads it, and no Python runs.
//
// The entry points' addresses are handed over by keras_layer/_native (numbabn_set_entry;
// the serial twins at load, the parallel versions from a background compile, which the
// serial twins stand in for until then): each operation in a parallel version and a serial twin (the same
// code compiled without Numba's thread pool), which inputs under
// numbabn.config.SERIAL_BELOW elements run, as numbabn's Python API does: waking a
// second thread costs more than it saves there, and the twin never touches the pool.
// Per-channel vectors are converted to float64 here: the entry points take float64.
// float16 (Eigen::half) and bfloat16 tensors go to the entry points compiled on their
// 16-bit patterns (c_entry_points("uint16") / ("int16"): the same 2-byte elements, read
// and written in their own format, float64 arithmetic inside); under Keras's
// mixed_float16 / mixed_bfloat16 policies their parameters are float32.
//
// Full-size outputs: an output takes over its input's buffer when TensorFlow allows it
// (nothing else reads the input); otherwise, at 256 KiB and more, it comes from a pool
// of buffers that return to the pool when TensorFlow drops the last reference to them
// (a TensorBuffer's destructor), so no buffer is reused while anything reads it. Here
// TensorFlow's CPU allocator hands out fresh pages for every large tensor (a 51 MB
// output: 12,500 page faults, ~15-30 ms a call); the pool's buffers are faulted in once
// (and asked for transparent huge pages). The pool keeps at most NUMBABN_POOL_MB
// (default 1024) MB of free buffers, freeing the oldest beyond that.

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
// The profiler's TraceMe where this TensorFlow ships it (2.13 and later); without it the
// op still builds, untraced.
#if defined(__has_include)
#if __has_include("tsl/profiler/lib/traceme.h")
#include "tsl/profiler/lib/traceme.h"
#define NUMBABN_TRACEME 1
#endif
#endif

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
namespace errors = tensorflow::errors;
namespace shape_inference = tensorflow::shape_inference;

// Slots of numbabn_set_entry; keep in step with _SLOTS in keras_layer/_native/__init__.py.
enum Slot {
  kTrainF32, kInferenceF32, kBackwardF32,
  kTrainF64, kInferenceF64, kBackwardF64,
  kTrainF16, kInferenceF16, kBackwardF16,
  kTrainBF16, kInferenceBF16, kBackwardBF16,
  kSerial,  // kSerial + slot: the serial twin of slot
  kSlots = 2 * kSerial
};

std::atomic<void*> g_entries[kSlots];
std::atomic<int64_t> g_serial_below{1 << 19};

using TrainFn = void (*)(const void*, void*, const double*, const double*, double*, double*,
                         double*, int64_t, int64_t, int64_t, double);
using InferenceFn = void (*)(const void*, void*, const double*, const double*, const double*,
                             const double*, int64_t, int64_t, int64_t, double);
using BackwardFn = void (*)(const void*, const void*, void*, const double*, const double*,
                            const double*, double*, double*, int64_t, int64_t, int64_t);

// ------------------------------------------------------------------- the buffer pool

class BufferPool {
 public:
  static BufferPool& Get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: buffers outlive exit
    return *pool;
  }

  void* Acquire(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* p = it->second.data;
        free_.erase(it);
        cached_ -= bytes;
        return p;
      }
    }
    void* p = std::aligned_alloc(kAlign, RoundUp(bytes));
    if (p != nullptr) madvise(p, RoundUp(bytes), MADV_HUGEPAGE);  // advice only
    return p;
  }

  void Release(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace(bytes, Entry{p, ++clock_});
      cached_ += bytes;
      while (cached_ > limit_ && !free_.empty()) {  // the least recently freed first
        auto oldest = free_.begin();
        for (auto it = free_.begin(); it != free_.end(); ++it) {
          if (it->second.stamp < oldest->second.stamp) oldest = it;
        }
        cached_ -= oldest->first;
        drop.push_back(oldest->second.data);
        free_.erase(oldest);
      }
    }
    for (void* q : drop) std::free(q);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  static constexpr size_t kAlign = 64;
  static constexpr size_t kMinBytes = 256 << 10;

 private:
  struct Entry {
    void* data;
    uint64_t stamp;
  };

  BufferPool() {
    const char* mb = std::getenv("NUMBABN_POOL_MB");
    limit_ = (mb ? std::strtoull(mb, nullptr, 10) : 1024ull) << 20;
  }
  static size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

  std::mutex mu_;
  std::multimap<size_t, Entry> free_;
  size_t cached_ = 0, limit_ = 0;
  uint64_t clock_ = 0;
};

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

// The slots of element type T: train, inference and backward follow one another.
template <typename T> struct Slots;
template <> struct Slots<float> { static constexpr int kFirst = kTrainF32; };
template <> struct Slots<double> { static constexpr int kFirst = kTrainF64; };
template <> struct Slots<Eigen::half> { static constexpr int kFirst = kTrainF16; };
template <> struct Slots<Eigen::bfloat16> { static constexpr int kFirst = kTrainBF16; };

template <typename T>
constexpr Slot TrainSlot() { return static_cast<Slot>(Slots<T>::kFirst); }
template <typename T>
constexpr Slot InferenceSlot() { return static_cast<Slot>(Slots<T>::kFirst + 1); }
template <typename T>
constexpr Slot BackwardSlot() { return static_cast<Slot>(Slots<T>::kFirst + 2); }

// The entry point of ``slot`` for an input of ``size`` elements: its serial twin below the
// threshold, or while the parallel version is not handed over yet.
template <typename Fn>
Status Entry(Slot slot, int64_t size, Fn* fn) {
  const int index = size < g_serial_below.load() ? kSerial + slot : slot;
  *fn = reinterpret_cast<Fn>(g_entries[index].load());
  if (*fn == nullptr && index == slot) {
    // the parallel version is still compiling (in the background, keras_layer/_native):
    // its serial twin computes the same bits
    *fn = reinterpret_cast<Fn>(g_entries[kSerial + slot].load());
  }
  if (*fn == nullptr) {
    return errors::FailedPrecondition(
        "numbabn's TensorFlow op has no entry points for this dtype yet; load it through "
        "keras_layer._native.load(), and call keras_layer._native.ensure(dtype) before "
        "running a restored graph of float64, float16 or bfloat16 ops (float32 is ready "
        "at load)");
  }
  return Status();
}

// What the three ops share: the channel axis attribute, and running inline.
class NumbabnOp : public OpKernel {
 public:
  explicit NumbabnOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("axis", &axis_));
  }

  // Run on the executor's own thread: handing the op to the inter-op pool costs a
  // thread switch per call, and the op parallelizes itself where that pays.
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
    TrainFn fn;
    OP_REQUIRES_OK(ctx, Entry(TrainSlot<T>(), x.NumElements(), &fn));

    Tensor *y, *mean, *var, *invstd;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &y));
    const TensorShape cs({b.channels});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, cs, &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, cs, &var));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(3, cs, &invstd));
    fn(x.flat<T>().data(), y->flat<T>().data(), gamma.data(), beta.data(),
       mean->flat<double>().data(), var->flat<double>().data(), invstd->flat<double>().data(),
       b.outer, b.channels, b.inner, eps);
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
    InferenceFn fn;
    OP_REQUIRES_OK(ctx, Entry(InferenceSlot<T>(), x.NumElements(), &fn));

    Tensor* y;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &y));
    if (x.NumElements() == 0) return;  // an empty batch normalizes to itself
    fn(x.flat<T>().data(), y->flat<T>().data(), gamma.data(), beta.data(), mm.data(),
       mv.data(), b.outer, b.channels, b.inner, eps);
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
    BackwardFn fn;
    OP_REQUIRES_OK(ctx, Entry(BackwardSlot<T>(), x.NumElements(), &fn));

    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, FullSizeOutput(ctx, 0, 0, x, &dx));
    const TensorShape cs({b.channels});
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, cs, &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, cs, &dbeta));
    std::vector<double> dg(b.channels), db(b.channels);
    fn(dy.flat<T>().data(), x.flat<T>().data(), dx->flat<T>().data(), gamma.data(),
       ctx->input(2).flat<double>().data(), ctx->input(3).flat<double>().data(), dg.data(),
       db.data(), b.outer, b.channels, b.inner);
    auto g = dgamma->flat<P>();
    auto s = dbeta->flat<P>();
    for (int64_t c = 0; c < b.channels; ++c) {
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
  if (slot < 0 || slot >= kSlots) return -1;
  g_entries[slot].store(fn);
  return 0;
}
__attribute__((visibility("default"))) void numbabn_set_serial_below(int64_t n) {
  g_serial_below.store(n);
}
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
