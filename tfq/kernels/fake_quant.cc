// Fused LSQ / LSQ+ fake quantisation for a per-tensor scale and offset (lsq-plus.txt eq. 2-4).
//
// TfqLsqFakeQuant:     y = round(clip((x - b) / s, qmin, qmax)) * s + b            (eq. 2)
// TfqLsqFakeQuantGrad: dx = dy inside [qmin, qmax], 0 outside;                      (eq. 3-4)
//                      dscale  = sum(dy * (round(v) - v)) inside + sum(dy * clip(v)) outside,
//                      doffset = sum(dy) outside; both sums times LSQ's gradient scale g.
//
// The forward is bit-identical to TensorFlow's separate ops (Sub, RealDiv, Minimum, Maximum, Round,
// Mul, Add): every step is one IEEE float32 operation in the same order, compiled with
// -ffp-contract=off so that c * s + b is never fused into an FMA, and rounding is half to even
// like tf.round. The gradient sums use fixed blocks and float64 partial sums added in block order,
// so they do not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfq {
namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

// Elements per block of the gradient's partial sums (fixed: the sums must not depend on threads).
constexpr int64_t kBlock = 16384;
// Independent accumulators per block (a multiple of every SIMD width in use).
constexpr int kLanes = 16;

// Round half to even, as tf.round, for |v| <= 2^22 (clipped codes are within +-2^8 here): adding
// and subtracting 1.5 * 2^23 leaves the nearest integer under the default rounding mode (the
// build has no -ffast-math, so the pair is not folded), and copysign keeps tf.round's -0 for
// values in (-0.5, 0). Vectorises on any x86-64 or arm64, unlike a call to nearbyintf.
constexpr float kMaxCode = 4194304.0f;  // 2^22
inline float RoundHalfEven(float v) {
  constexpr float kMagic = 12582912.0f;
  return std::copysign((v + kMagic) - kMagic, v);
}

// The same order of operations as tf.clip_by_value (Minimum, then Maximum).
inline float Clip(float v, float qmin, float qmax) { return std::max(std::min(v, qmax), qmin); }

// One element of eq. 3-4, branch-free (so loops over it vectorise) and with the same float32
// products as the TensorFlow-op form: dx = dy * inside, dscale term = dy * (code - v * inside),
// doffset term = dy * (1 - inside); inside counts v == qmin and v == qmax.
inline void GradTerms(float x, float dy, float s, float b, float qmin, float qmax, float* dx,
                      double* scale_sum, double* offset_sum) {
  const float v = (x - b) / s;
  const float code = RoundHalfEven(Clip(v, qmin, qmax));
  const float inside = static_cast<float>((v >= qmin) & (v <= qmax));
  *dx = dy * inside;
  *scale_sum += static_cast<double>(dy * (code - v * inside));
  *offset_sum += static_cast<double>(dy * (1.0f - inside));
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX-512 and AVX2 copies of the element loops, one chosen at load time by what the CPU has (no
// FMA: the build's -ffp-contract=off holds in every copy; the float64 lanes keep the sums' order)
#define TFQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFQ_VECTOR_CLONES
#endif

// Eq. 2 on elements [start, end).
TFQ_VECTOR_CLONES
void ForwardRange(const float* __restrict in, float* __restrict out, int64_t start, int64_t end, float s,
                  float b, float qmin, float qmax) {
  for (int64_t i = start; i < end; ++i) {
    const float code = RoundHalfEven(Clip((in[i] - b) / s, qmin, qmax));
    out[i] = code * s + b;
  }
}

// Eq. 3-4 on elements [begin, end): dx, and the block's dscale and doffset sums. kLanes
// independent float64 accumulators per sum let the compiler vectorise without reassociating
// anything; the lanes are added in a fixed order at the end. dx may alias dy.
TFQ_VECTOR_CLONES
void GradBlock(const float* __restrict in, const float* dy, float* dx, int64_t begin, int64_t end, float s,
               float b, float qmin, float qmax, double* scale_sum, double* offset_sum) {
  double scale_lanes[kLanes] = {0.0}, offset_lanes[kLanes] = {0.0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    float upstream[kLanes], result[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) upstream[lane] = dy[i + lane];
    for (int lane = 0; lane < kLanes; ++lane) {
      GradTerms(in[i + lane], upstream[lane], s, b, qmin, qmax, &result[lane], &scale_lanes[lane],
                &offset_lanes[lane]);
    }
    for (int lane = 0; lane < kLanes; ++lane) dx[i + lane] = result[lane];
  }
  for (int lane = 0; i < end; ++i, ++lane) {  // the tail, fewer than kLanes elements
    float result;
    GradTerms(in[i], dy[i], s, b, qmin, qmax, &result, &scale_lanes[lane], &offset_lanes[lane]);
    dx[i] = result;
  }
  double scale_total = 0.0, offset_total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) {
    scale_total += scale_lanes[lane];
    offset_total += offset_lanes[lane];
  }
  *scale_sum = scale_total;
  *offset_sum = offset_total;
}

float ScalarInput(OpKernelContext* ctx, int index, const char* name, bool* ok) {
  const Tensor& t = ctx->input(index);
  if (t.NumElements() != 1) {
    ctx->CtxFailure(InvalidArgument("TfqLsqFakeQuant: ", name,
                                    " must hold one value (per-tensor quantizer), got shape ",
                                    t.shape().DebugString()));
    *ok = false;
    return 0.0f;
  }
  return t.flat<float>()(0);
}

class AttrRange {
 public:
  explicit AttrRange(OpKernelConstruction* ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmin", &qmin_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("qmax", &qmax_));
    OP_REQUIRES(ctx, qmin_ < qmax_,
                InvalidArgument("TfqLsqFakeQuant: qmin (", qmin_, ") must be below qmax (", qmax_, ")"));
    OP_REQUIRES(ctx, std::abs(qmin_) <= kMaxCode && std::abs(qmax_) <= kMaxCode,
                InvalidArgument("TfqLsqFakeQuant: qmin and qmax must lie within +-2^22 (RoundHalfEven), got ",
                                qmin_, ", ", qmax_));
  }
  float qmin_ = 0.0f, qmax_ = 0.0f;
};

class LsqFakeQuantOp : public OpKernel {
 public:
  explicit LsqFakeQuantOp(OpKernelConstruction* ctx) : OpKernel(ctx), range_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    bool ok = true;
    const float s = ScalarInput(ctx, 1, "scale", &ok);
    const float b = ScalarInput(ctx, 2, "offset", &ok);
    if (!ok) return;
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const float* in = x.flat<float>().data();
    float* out = y->flat<float>().data();
    const float qmin = range_.qmin_, qmax = range_.qmax_;
    auto work = [=](int64_t start, int64_t end) { ForwardRange(in, out, start, end, s, b, qmin, qmax); };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, x.NumElements(), /*cost_per_unit=*/8, work);
  }

 private:
  AttrRange range_;
};

class LsqFakeQuantGradOp : public OpKernel {
 public:
  explicit LsqFakeQuantGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), range_(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                InvalidArgument("TfqLsqFakeQuantGrad: dy shape ", dy.shape().DebugString(),
                                " differs from x shape ", x.shape().DebugString()));
    bool ok = true;
    const float s = ScalarInput(ctx, 2, "scale", &ok);
    const float b = ScalarInput(ctx, 3, "offset", &ok);
    const double gradient_scale = ScalarInput(ctx, 4, "gradient_scale", &ok);
    if (!ok) return;
    Tensor *dx = nullptr, *dscale = nullptr, *doffset = nullptr;
    // dx may take over dy's buffer (each element of dy is read before its dx is written)
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &doffset));

    const int64_t n = x.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> scale_sums(blocks, 0.0), offset_sums(blocks, 0.0);
    const float* g = dy.flat<float>().data();
    const float* in = x.flat<float>().data();
    float* out = dx->flat<float>().data();
    const float qmin = range_.qmin_, qmax = range_.qmax_;
    double* ss = scale_sums.data();
    double* os = offset_sums.data();
    auto work = [=](int64_t first_block, int64_t end_block) {
      for (int64_t block = first_block; block < end_block; ++block) {
        GradBlock(in, g, out, block * kBlock, std::min(n, (block + 1) * kBlock), s, b, qmin, qmax, &ss[block],
                  &os[block]);
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, blocks, /*cost_per_unit=*/kBlock * 12, work);
    double scale_total = 0.0, offset_total = 0.0;
    for (int64_t block = 0; block < blocks; ++block) {
      scale_total += scale_sums[block];
      offset_total += offset_sums[block];
    }
    dscale->scalar<float>()() = static_cast<float>(scale_total * gradient_scale);
    doffset->scalar<float>()() = static_cast<float>(offset_total * gradient_scale);
  }

 private:
  AttrRange range_;
};

}  // namespace

REGISTER_OP("TfqLsqFakeQuant")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Output("y: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_OP("TfqLsqFakeQuantGrad")
    .Input("dy: float")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Input("gradient_scale: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Output("dx: float")
    .Output("dscale: float")
    .Output("doffset: float")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("TfqLsqFakeQuant").Device(tensorflow::DEVICE_CPU), LsqFakeQuantOp);
REGISTER_KERNEL_BUILDER(Name("TfqLsqFakeQuantGrad").Device(tensorflow::DEVICE_CPU), LsqFakeQuantGradOp);

}  // namespace tfq
