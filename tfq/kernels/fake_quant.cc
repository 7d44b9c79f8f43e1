// Fused LSQ / LSQ+ fake quantisation for a per-tensor scale and offset (lsq-plus.txt eq. 2-4),
// optionally of an activation function's output computed in the same pass.
//
// TfqLsqFakeQuant:     a = act(x); y = round(clip((a - b) / s, qmin, qmax)) * s + b   (eq. 2)
// TfqLsqFakeQuantGrad: dx = dy * act'(x) inside [qmin, qmax], 0 outside;           (eq. 3-4)
//                      dscale  = sum(dy * (round(v) - v)) inside + sum(dy * clip(v)) outside,
//                      doffset = sum(dy) outside; both sums times LSQ's gradient scale g.
// act is the attribute `activation`: linear (the identity), relu, relu6, hard_swish
// (x * relu6(x + 3) * (1/6), tfq.models.hard_swish), swish (x * sigmoid(x)) or quantized_swish
// (x * q(sigmoid(x)), q = TFLite's fixed sigmoid grid of step 1/256, codes 0..255).
//
// The forward is bit-identical to TensorFlow's separate ops (the activation's ops, then Sub, RealDiv,
// Minimum, Maximum, Round, Mul, Add), and so is dx: every step is one IEEE float32 operation in the
// same order, compiled with -ffp-contract=off so that c * s + b is never fused into an FMA, and
// rounding is half to even like tf.round. The swish sigmoid is the vectorised algorithm of Eigen's
// float logistic that TensorFlow's Sigmoid kernel runs, written out per element; TensorFlow computes
// a tensor's last (size mod SIMD width) elements with Eigen's scalar sigmoid, which can differ by an
// ulp. The gradient sums use fixed blocks and float64 partial sums added in block order, so they do
// not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

enum class Activation { kLinear, kRelu, kRelu6, kHardSwish, kSwish, kQuantizedSwish };

// TFLite's fixed int8 LOGISTIC output grid: step 1/256, codes 0..255 (tfq.quantizers.fixed).
constexpr float kSigmoidStep = 0.00390625f;
constexpr float kSigmoidCodeMax = 255.0f;

// Eigen's float logistic (scalar_logistic_op<float>::packetOp), one element at a time and without
// FMA: range reduction by 2, exp(r) by its degree-5 polynomial, exp(x) = (2^m exp(r))^2.
inline float Sigmoid(float x0) {
  const bool below_range = x0 < -104.0f;  // Eigen returns exactly 0 there
  float x = std::min(x0, 16.6355324f) * 0.5f;
  // m = floor(t) by rounding to nearest and stepping down (exact for |t| < 2^22, which holds for
  // every x0 >= -104; below, the result is 0 whatever m is); std::floor would not vectorise
  const float t = x * 1.44269504088896341f + 0.5f;
  const float nearest = RoundHalfEven(t);
  const float m = nearest > t ? nearest - 1.0f : nearest;
  float r = m * -0.693359375f + x;
  r = m * 2.12194440e-4f + r;
  const float r2 = r * r;
  const float p_even = r2 * 4.1898667812347412109375e-2f + 0.49999141693115234375f;
  const float p_odd = r2 * 8.33471305668354034423828125e-3f + 0.16666877269744873046875f;
  const float p_low = r + 1.0f;
  float p = r * p_odd + p_even;
  p = r2 * p + p_low;
  const int32_t biased = static_cast<int32_t>(std::min(std::max(m + 127.0f, 0.0f), 255.0f));
  const uint32_t bits = static_cast<uint32_t>(biased) << 23;
  float two_m;
  std::memcpy(&two_m, &bits, sizeof(two_m));
  float e = p * two_m;
  e = e * e;
  const float sigmoid = e / (1.0f + e);  // computed before the select: GCC does not if-convert
  return below_range ? 0.0f : sigmoid;  // a division that may trap, so it would not vectorise
}

// act(x) and what its derivative reuses, computed once per element.
struct ActPoint {
  float value;
  float sigmoid;
  float gate;         // quantized_swish: the sigmoid on its grid
  float gate_inside;  // quantized_swish: 1 where the grid passes the gradient through, else 0
};

// act(x), in TensorFlow's order of operations.
template <Activation A>
inline ActPoint Evaluate(float x) {
  ActPoint p = {x, 0.0f, 0.0f, 0.0f};
  if (A == Activation::kRelu) p.value = std::max(x, 0.0f);
  if (A == Activation::kRelu6) p.value = std::min(std::max(x, 0.0f), 6.0f);
  if (A == Activation::kHardSwish) p.value = (x * std::min(std::max(x + 3.0f, 0.0f), 6.0f)) * (1.0f / 6.0f);
  if (A == Activation::kSwish || A == Activation::kQuantizedSwish) p.sigmoid = Sigmoid(x);
  if (A == Activation::kSwish) p.value = x * p.sigmoid;
  if (A == Activation::kQuantizedSwish) {  // as tfq's FixedRangeQuantizer("sigmoid") in training
    const float v = p.sigmoid / kSigmoidStep;
    p.gate = RoundHalfEven(Clip(v, 0.0f, kSigmoidCodeMax)) * kSigmoidStep + 0.0f;
    p.gate_inside = static_cast<float>((v >= 0.0f) & (v <= kSigmoidCodeMax));  // as GradTerms' inside
    p.value = x * p.gate;
  }
  return p;
}

// dL/dx from g = dL/d act(x), as TensorFlow's gradients of the same ops compute it: ReluGrad and
// Relu6Grad pass g where 0 < x (< 6); hard_swish's Mul, Mul, Relu6, Add gradients give
// (g c) r + ((g c) x) [0 < x + 3 < 6]; swish's gradient is g * (sig * (1 + x * (1 - sig))).
// quantized_swish is x * q(sigmoid(x)) with q TFLite's fixed sigmoid grid: tfq's form of swish
// (tfq.graph splits a swish Activation into a sigmoid Activation and a Multiply); its gradient is
// Mul's, the grid's straight-through one and SigmoidGrad's, g q + (g x) [inside] (sig (1 - sig)).
template <Activation A>
inline float Chain(float x, const ActPoint& p, float g) {
  if (A == Activation::kRelu) return x > 0.0f ? g : 0.0f;
  if (A == Activation::kRelu6) return (x > 0.0f) & (x < 6.0f) ? g : 0.0f;
  if (A == Activation::kHardSwish) {
    const float t = x + 3.0f;
    const float gc = g * (1.0f / 6.0f);
    const float gcx = gc * x;
    const float through = (t > 0.0f) & (t < 6.0f) ? gcx : 0.0f;
    return gc * std::min(std::max(t, 0.0f), 6.0f) + through;
  }
  if (A == Activation::kSwish) return g * (p.sigmoid * (1.0f + x * (1.0f - p.sigmoid)));
  if (A == Activation::kQuantizedSwish) {
    return g * p.gate + ((g * x) * p.gate_inside) * (p.sigmoid * (1.0f - p.sigmoid));
  }
  return g;
}

// One element of eq. 3-4, branch-free (so loops over it vectorise) and with the same float32
// products as the TensorFlow-op form: dx = dy * inside, dscale term = dy * (code - v * inside),
// doffset term = dy * (1 - inside); inside counts v == qmin and v == qmax.
template <Activation A>
inline void GradTerms(float x, float dy, float s, float b, float qmin, float qmax, float* dx,
                      double* scale_sum, double* offset_sum) {
  const ActPoint point = Evaluate<A>(x);
  const float v = (point.value - b) / s;
  const float code = RoundHalfEven(Clip(v, qmin, qmax));
  const float inside = static_cast<float>((v >= qmin) & (v <= qmax));
  *dx = Chain<A>(x, point, dy * inside);
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

#define TFQ_INLINE inline __attribute__((always_inline))

// Eq. 2 on elements [start, end).
template <Activation A>
TFQ_INLINE void ForwardRange(const float* __restrict in, float* __restrict out, int64_t start, int64_t end, float s,
                  float b, float qmin, float qmax) {
  for (int64_t i = start; i < end; ++i) {
    const float code = RoundHalfEven(Clip((Evaluate<A>(in[i]).value - b) / s, qmin, qmax));
    out[i] = code * s + b;
  }
}

// Eq. 3-4 on elements [begin, end): dx, and the block's dscale and doffset sums. kLanes
// independent float64 accumulators per sum let the compiler vectorise without reassociating
// anything; the lanes are added in a fixed order at the end. dx may alias dy.
template <Activation A>
TFQ_INLINE void GradBlock(const float* __restrict in, const float* dy, float* dx, int64_t begin, int64_t end, float s,
               float b, float qmin, float qmax, double* scale_sum, double* offset_sum) {
  double scale_lanes[kLanes] = {0.0}, offset_lanes[kLanes] = {0.0};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    float upstream[kLanes], result[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) upstream[lane] = dy[i + lane];
#pragma omp simd
    for (int lane = 0; lane < kLanes; ++lane) {
      GradTerms<A>(in[i + lane], upstream[lane], s, b, qmin, qmax, &result[lane], &scale_lanes[lane],
                &offset_lanes[lane]);
    }
    for (int lane = 0; lane < kLanes; ++lane) dx[i + lane] = result[lane];
  }
  for (int lane = 0; i < end; ++i, ++lane) {  // the tail, fewer than kLanes elements
    float result;
    GradTerms<A>(in[i], dy[i], s, b, qmin, qmax, &result, &scale_lanes[lane], &offset_lanes[lane]);
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

// One vectorised copy of each loop per activation (target_clones does not apply to templates).
using ForwardFn = void (*)(const float*, float*, int64_t, int64_t, float, float, float, float);
using GradFn = void (*)(const float*, const float*, float*, int64_t, int64_t, float, float, float, float,
                        double*, double*);
#define TFQ_LOOPS(NAME, ACT)                                                                            \
  TFQ_VECTOR_CLONES void Forward##NAME(const float* __restrict in, float* __restrict out, int64_t start,    \
                                       int64_t end, float s, float b, float qmin, float qmax) {          \
    ForwardRange<ACT>(in, out, start, end, s, b, qmin, qmax);                                           \
  }                                                                                                     \
  TFQ_VECTOR_CLONES void Grad##NAME(const float* __restrict in, const float* dy, float* dx, int64_t begin, \
                                    int64_t end, float s, float b, float qmin, float qmax,               \
                                    double* scale_sum, double* offset_sum) {                            \
    GradBlock<ACT>(in, dy, dx, begin, end, s, b, qmin, qmax, scale_sum, offset_sum);                     \
  }
TFQ_LOOPS(Linear, Activation::kLinear)
TFQ_LOOPS(Relu, Activation::kRelu)
TFQ_LOOPS(Relu6, Activation::kRelu6)
TFQ_LOOPS(HardSwish, Activation::kHardSwish)
TFQ_LOOPS(Swish, Activation::kSwish)
TFQ_LOOPS(QuantizedSwish, Activation::kQuantizedSwish)
#undef TFQ_LOOPS

struct Loops {
  ForwardFn forward;
  GradFn grad;
};

// The loops for the op's `activation` attribute.
class AttrActivation {
 public:
  explicit AttrActivation(OpKernelConstruction* ctx) {
    std::string name;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &name));
    if (name == "linear") {
      loops_ = {ForwardLinear, GradLinear};
    } else if (name == "relu") {
      loops_ = {ForwardRelu, GradRelu};
    } else if (name == "relu6") {
      loops_ = {ForwardRelu6, GradRelu6};
    } else if (name == "hard_swish") {
      loops_ = {ForwardHardSwish, GradHardSwish};
    } else if (name == "swish") {
      loops_ = {ForwardSwish, GradSwish};
    } else if (name == "quantized_swish") {
      loops_ = {ForwardQuantizedSwish, GradQuantizedSwish};
    } else {  // the op registration's list already rejects other names
      ctx->CtxFailure(InvalidArgument("TfqLsqFakeQuant: unknown activation ", name));
    }
  }
  Loops loops_ = {ForwardLinear, GradLinear};
};

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
  explicit LsqFakeQuantOp(OpKernelConstruction* ctx) : OpKernel(ctx), range_(ctx), activation_(ctx) {}

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
    const ForwardFn forward = activation_.loops_.forward;
    auto work = [=](int64_t start, int64_t end) { forward(in, out, start, end, s, b, qmin, qmax); };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, x.NumElements(), /*cost_per_unit=*/8, work);
  }

 private:
  AttrRange range_;
  AttrActivation activation_;
};

class LsqFakeQuantGradOp : public OpKernel {
 public:
  explicit LsqFakeQuantGradOp(OpKernelConstruction* ctx) : OpKernel(ctx), range_(ctx), activation_(ctx) {}

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
    const GradFn grad = activation_.loops_.grad;
    auto work = [=](int64_t first_block, int64_t end_block) {
      for (int64_t block = first_block; block < end_block; ++block) {
        grad(in, g, out, block * kBlock, std::min(n, (block + 1) * kBlock), s, b, qmin, qmax, &ss[block],
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
  AttrActivation activation_;
};

}  // namespace

REGISTER_OP("TfqLsqFakeQuant")
    .Input("x: float")
    .Input("scale: float")
    .Input("offset: float")
    .Attr("qmin: float")
    .Attr("qmax: float")
    .Attr("activation: {'linear', 'relu', 'relu6', 'hard_swish', 'swish', 'quantized_swish'} = 'linear'")
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
    .Attr("activation: {'linear', 'relu', 'relu6', 'hard_swish', 'swish', 'quantized_swish'} = 'linear'")
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
