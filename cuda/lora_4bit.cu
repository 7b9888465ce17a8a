// CUDA LoRA on a 4-bit weight (include/fourbit/lora.h): the base product by the 4-bit
// kernels of gemm_4bit_cuda (gemv at small M, tiled dequantizing kernels above), the
// adapter terms by one small tiled GEMM kernel, and nothing else. The CPU twin is
// src/lora_4bit.cpp.
//
//   forward   XA  = X_l A^T                    small GEMM, XA written in the io dtype
//             Y   = X deq(W)^T + bias          gemm_4bit_cuda
//             Y  += s XA B^T                   small GEMM accumulating into Y (the epilogue:
//                                              scale and B folded, no [M, N] temporary)
//   backward  G   = s dY B                     small GEMM into an fp32 [M, r] workspace
//             dX  = dY deq(W) (+ G A)          gemm_4bit_grad_input_cuda, then accumulate
//             dX_l = G A, dA = G^T X_l, dB = s dY^T XA   small GEMMs
//
// The small GEMM: C[rows, cols] = alpha * P @ Q (+ C), P and Q read through strides so one
// kernel serves every transpose above. A CTA of 32 x 8 threads owns a 32 x 32 tile of C
// (4 outputs per thread, fp32 accumulators) and stages 32-deep slices of P and Q in shared
// memory. Every adapter product is O(M r (N + K)), at most r / min(N, K) of the 4-bit
// product, so this simple kernel is enough for C++ callers and small M; the torch binding
// routes large M to dequantize + cuBLAS (src/torch/lora_ops_cuda.cpp).
//
// Rounding: Y is rounded once by the base product and once more after the adapter term,
// and the epilogue reads XA in the io dtype, as an unfused PEFT layer does (the CPU path
// rounds once; both sit inside the tolerances of tests/python/test_lora_op.py).
#include <algorithm>

#include "common.cuh"
#include "fourbit/lora.h"

namespace fourbit {
namespace cuda {
namespace {

constexpr int kTile = 32;      // output tile edge and reduction slice depth
constexpr int kRowsPerPass = 8;  // thread rows: each thread owns kTile / 8 = 4 outputs
constexpr unsigned int kMaxGridY = 65535;  // CUDA's limit; larger column counts loop

template <typename TP, typename TQ, typename TC>
struct SmallGemm {
  const TP* p;  // P(i, k) = p[i * p_row + k * p_col]
  const TQ* q;  // Q(k, j) = q[k * q_row + j * q_col]
  TC* c;        // C[i * cols + j]
  int64_t p_row, p_col, q_row, q_col;
  int64_t rows, cols, depth;
  float alpha;
  bool accumulate;  // C += alpha P Q instead of C = alpha P Q
};

template <typename TP, typename TQ, typename TC>
__global__ void __launch_bounds__(kTile * kRowsPerPass)
    small_gemm_kernel(SmallGemm<TP, TQ, TC> g) {
  __shared__ float ps[kTile][kTile + 1];  // +1: column reads hit distinct banks
  __shared__ float qs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col_tiles = (g.cols + kTile - 1) / kTile;
  for (int64_t ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {
    const int64_t j0 = ct * kTile;
    float acc[kTile / kRowsPerPass] = {};
    for (int64_t k0 = 0; k0 < g.depth; k0 += kTile) {
      for (int r = ty; r < kTile; r += kRowsPerPass) {
        const int64_t i = i0 + r, k = k0 + tx;
        ps[r][tx] = (i < g.rows && k < g.depth) ? to_float(g.p[i * g.p_row + k * g.p_col]) : 0.0f;
        const int64_t kk = k0 + r, j = j0 + tx;
        qs[r][tx] = (kk < g.depth && j < g.cols) ? to_float(g.q[kk * g.q_row + j * g.q_col]) : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kTile; ++k) {
        const float qv = qs[k][tx];
#pragma unroll
        for (int a = 0; a < kTile / kRowsPerPass; ++a) acc[a] += ps[ty + a * kRowsPerPass][k] * qv;
      }
      __syncthreads();
    }
#pragma unroll
    for (int a = 0; a < kTile / kRowsPerPass; ++a) {
      const int64_t i = i0 + ty + a * kRowsPerPass, j = j0 + tx;
      if (i < g.rows && j < g.cols) {
        TC* out = g.c + i * g.cols + j;
        const float prior = g.accumulate ? to_float(*out) : 0.0f;
        *out = from_float<TC>(g.alpha * acc[a] + prior);
      }
    }
  }
}

template <typename TP, typename TQ, typename TC>
void launch_small_gemm(const SmallGemm<TP, TQ, TC>& g, cudaStream_t stream) {
  if (g.rows == 0 || g.cols == 0) return;
  const int64_t row_tiles = (g.rows + kTile - 1) / kTile;
  FOURBIT_CHECK_ARG(row_tiles <= INT32_MAX, "lora_4bit_cuda: ", g.rows,
                    " rows exceed the grid limit of the adapter kernel");
  const int64_t col_tiles = (g.cols + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned int>(row_tiles),
                  static_cast<unsigned int>(std::min<int64_t>(col_tiles, kMaxGridY)));
  small_gemm_kernel<TP, TQ, TC><<<grid, dim3(kTile, kRowsPerPass), 0, stream>>>(g);
  FOURBIT_CUDA_LAUNCH_CHECK();
}

template <typename TP, typename TQ, typename TC>
SmallGemm<TP, TQ, TC> small_gemm(const TP* p, int64_t p_row, int64_t p_col, const TQ* q,
                                 int64_t q_row, int64_t q_col, TC* c, int64_t rows, int64_t cols,
                                 int64_t depth, float alpha, bool accumulate) {
  return SmallGemm<TP, TQ, TC>{p, q, c, p_row, p_col, q_row, q_col, rows, cols, depth, alpha,
                               accumulate};
}

// An fp32 device workspace on `stream` (stream-ordered allocation), freed on destruction.
class StreamBuffer {
 public:
  StreamBuffer(int64_t numel, cudaStream_t stream) : stream_(stream) {
    if (numel > 0) {
      FOURBIT_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&data_),
                                         static_cast<size_t>(numel) * sizeof(float), stream));
    }
  }
  ~StreamBuffer() {
    if (data_) cudaFreeAsync(data_, stream_);
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  cudaStream_t stream_;
};

template <typename T>
void forward(const Lora4bitForwardParams& p, cudaStream_t stream) {
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K, r = p.r;
  const T* x = static_cast<const T*>(p.x);
  const T* x_lora = p.x_lora ? static_cast<const T*>(p.x_lora) : x;
  const T* a = static_cast<const T*>(p.lora_a);
  const T* b = static_cast<const T*>(p.lora_b);
  T* xa = static_cast<T*>(p.xa);
  // XA[m][q] = sum_k X_l[m][k] A[q][k].
  launch_small_gemm(small_gemm(x_lora, K, 1, a, 1, K, xa, M, r, K, 1.0f, false), stream);
  if (N == 0) return;
  gemm_4bit_cuda(base_product_params(p), stream);
  // Y[m][n] += s sum_q XA[m][q] B[n][q].
  launch_small_gemm(small_gemm(static_cast<const T*>(xa), r, 1, b, 1, r, static_cast<T*>(p.y), M,
                               N, r, static_cast<float>(p.scaling), true),
                    stream);
}

template <typename T>
void backward(const Lora4bitBackwardParams& p, cudaStream_t stream) {
  const int64_t M = p.M, N = p.weight.N, K = p.weight.K, r = p.r;
  const float s = static_cast<float>(p.scaling);
  const T* dy = static_cast<const T*>(p.grad_output);
  const T* a = static_cast<const T*>(p.lora_a);
  const T* b = static_cast<const T*>(p.lora_b);
  const bool adapter_into_dx = p.grad_input && !p.separate_lora_input;
  const bool need_g = adapter_into_dx || p.grad_input_lora || p.grad_a;

  StreamBuffer g(need_g ? M * r : 0, stream);
  if (need_g) {
    // G[m][q] = s sum_n dY[m][n] B[n][q], fp32.
    launch_small_gemm(small_gemm(dy, N, 1, b, r, 1, g.data(), M, r, N, s, false), stream);
  }
  if (p.grad_input && M > 0 && K > 0) {
    Gemm4bitGradInputParams base;
    base.weight = p.weight;
    base.grad_output = p.grad_output;
    base.grad_input = p.grad_input;
    base.M = M;
    base.dtype = p.dtype;
    gemm_4bit_grad_input_cuda(base, stream);
    if (adapter_into_dx) {
      // dX[m][k] += sum_q G[m][q] A[q][k].
      launch_small_gemm(small_gemm(static_cast<const float*>(g.data()), r, 1, a, K, 1,
                                   static_cast<T*>(p.grad_input), M, K, r, 1.0f, true),
                        stream);
    }
  }
  if (p.grad_input_lora) {
    launch_small_gemm(small_gemm(static_cast<const float*>(g.data()), r, 1, a, K, 1,
                                 static_cast<T*>(p.grad_input_lora), M, K, r, 1.0f, false),
                      stream);
  }
  if (p.grad_a) {
    // dA[q][k] = sum_m G[m][q] X_l[m][k].
    launch_small_gemm(small_gemm(static_cast<const float*>(g.data()), 1, r,
                                 static_cast<const T*>(p.x_lora), K, 1, static_cast<T*>(p.grad_a),
                                 r, K, M, 1.0f, false),
                      stream);
  }
  if (p.grad_b) {
    // dB[n][q] = s sum_m dY[m][n] XA[m][q].
    launch_small_gemm(small_gemm(dy, 1, N, static_cast<const T*>(p.xa), r, 1,
                                 static_cast<T*>(p.grad_b), N, r, M, s, false),
                      stream);
  }
}

}  // namespace
}  // namespace cuda

void lora_4bit_forward_cuda(const Lora4bitForwardParams& p, cudaStream_t stream) {
  validate(p);
  if (p.M == 0) return;
  cuda::dispatch_dtype(p.dtype, [&](auto tag) { cuda::forward<decltype(tag)>(p, stream); });
}

void lora_4bit_backward_cuda(const Lora4bitBackwardParams& p, cudaStream_t stream) {
  validate(p);
  cuda::dispatch_dtype(p.dtype, [&](auto tag) { cuda::backward<decltype(tag)>(p, stream); });
}

}  // namespace fourbit
