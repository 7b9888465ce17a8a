// CPU LoRA on a 4-bit weight: forward and backward built on the blocked 4-bit drivers of
// gemm_4bit_driver.h, with the adapter folded into their epilogues.
//
//   forward   XA = X_l A^T         the blocked driver with A's r rows as the output
//                                  columns (one more column tile per row chunk), fp32 kept
//             Y  = X deq(W)^T      the blocked 4-bit driver; its finish adds
//                  + s XA B^T      the r-deep product (s XA)[tile rows] @ B^T[:, tile cols]
//                  + bias          with the micro-kernel, then bias, and rounds once
//   backward  G  = s dY B          fp32 [M, r], the driver with B's rows as a dense B
//             dX = dY deq(W)       the blocked input-gradient driver; its finish extends
//                  + G A           the reduction by the r dense rows of A (G as their
//                                  activations), i.e. [dY, G] @ [deq(W); A] in one pass
//             dX_l = G A           (separate X_l only) the driver with a dense fill
//             dA = G^T X_l         the driver over rows = r, reduction = M
//             dB = (s XA)^T dY     likewise, transposed on the store
//
// Why this shape: the 4-bit product is the cost (M N K); every adapter term is M r (N + K)
// or less. Folding them into the tile write-out means Y and dX are written once, already
// final, with one rounding, and no [M, N] or [M, K] temporary exists. The base pass reads
// X and the adapter pass X_l: with LoRA dropout they differ, so X_l goes only through the
// XA product (r columns) and the dA product, never through the 4-bit product.
#include <algorithm>
#include <vector>

#include "element_io.h"
#include "fourbit/codebook.h"
#include "fourbit/error.h"
#include "fourbit/lora.h"
#include "gemm_4bit_driver.h"

namespace fourbit {

// ---------------------------------------------------------------------------- validation

namespace {

// Runs a gemm.h validation of the base product, naming the LoRA op in its message.
template <typename BaseParams>
void validate_base(const BaseParams& base, const char* op) {
  try {
    validate(base);
  } catch (const Error& e) {
    throw Error(e.kind(), detail::concat(op, " (base product) ", e.what()));
  }
}

void check_rank(int64_t r, const char* op) {
  FOURBIT_CHECK_ARG(r >= 1 && r <= kLoraMaxRank, op, ": r (the adapter rank) must be in [1, ",
                    kLoraMaxRank, "], got ", r);
}

void check_ptr(const void* ptr, int64_t numel, const char* op, const char* name) {
  FOURBIT_CHECK_ARG(numel == 0 || ptr != nullptr, op, ": ", name, " is null but numel is ", numel);
}

}  // namespace

void validate(const Lora4bitForwardParams& p) {
  const char* op = "lora_4bit_forward";
  validate_base(base_product_params(p), op);
  check_rank(p.r, op);
  const int64_t N = p.weight.N, K = p.weight.K;
  check_ptr(p.lora_a, checked_mul(p.r, K, op, "r * K"), op, "lora_a");
  check_ptr(p.lora_b, checked_mul(N, p.r, op, "N * r"), op, "lora_b");
  check_ptr(p.xa, checked_mul(p.M, p.r, op, "M * r"), op, "xa");
  checked_mul(p.M * N, p.r, op, "M * N * r (the adapter's work)");  // M * N: checked by the base
  checked_mul(p.M * K, p.r, op, "M * K * r (the adapter's work)");
}

void validate(const Lora4bitBackwardParams& p) {
  const char* op = "lora_4bit_backward";
  Gemm4bitGradInputParams base;
  base.weight = p.weight;
  base.grad_output = p.grad_output;
  base.M = p.M;
  base.dtype = p.dtype;
  // grad_input is optional here: validate the rest of the base with a stand-in when it is
  // null (never written: the backward skips dX then).
  static char unused_grad_input;
  base.grad_input = p.grad_input ? p.grad_input : &unused_grad_input;
  validate_base(base, op);
  check_rank(p.r, op);
  const int64_t N = p.weight.N, K = p.weight.K, M = p.M, r = p.r;
  FOURBIT_CHECK_ARG(p.separate_lora_input || p.grad_input_lora == nullptr, op,
                    ": grad_input_lora is given but separate_lora_input is false (without a "
                    "separate X_l the adapter's input gradient is part of grad_input)");
  check_ptr(p.lora_a, checked_mul(r, K, op, "r * K"), op, "lora_a");
  check_ptr(p.lora_b, checked_mul(N, r, op, "N * r"), op, "lora_b");
  if (p.grad_a) check_ptr(p.x_lora, checked_mul(M, K, op, "M * K"), op, "x_lora (needed for grad_a)");
  if (p.grad_b) check_ptr(p.xa, checked_mul(M, r, op, "M * r"), op, "xa (needed for grad_b)");
  checked_mul(M * N, r, op, "M * N * r (the adapter's work)");  // M * N, M * K: checked by the base
  checked_mul(M * K, r, op, "M * K * r (the adapter's work)");
}

// ---------------------------------------------------------------------------- kernels

namespace {

using detail::OutputTile;

template <typename T>
std::vector<float> to_fp32(const void* src, int64_t n) {
  const T* s = static_cast<const T*>(src);
  std::vector<float> out(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) if (n >= detail::kParallelMinFlops)
  for (int64_t i = 0; i < n; ++i) out[i] = detail::to_float(s[i]);
  return out;
}

// acc[i][j] += sum_q P[i][q] * Q[q][j] over a tile: the low-rank term of an epilogue.
// P holds the tile's rows (row stride r, fp32); `fill_q(c0, clen, tile, ld)` writes
// Q[q][c0 + j] to tile[q * ld + j] for q < r, j < clen, and zeros for clen <= j < ld.
template <typename FillQ>
void add_low_rank(const OutputTile& t, float* acc, const float* P, int64_t r, const FillQ& fill_q) {
  static thread_local std::vector<float> q_tile;
  if (q_tile.size() < static_cast<size_t>(r * t.ld)) q_tile.resize(r * t.ld);
  fill_q(t.c0, t.clen, q_tile.data(), t.ld);
  detail::sweep_micro_kernel(t, detail::kFp32Micro, [&](int rows, int64_t m, int64_t c) {
    detail::micro_kernel(rows, r, P + m * r, r, q_tile.data() + c, t.ld, acc + m * t.ld + c, t.ld);
  });
}

// Q tiles (and B tiles of the dense products) from fp32 matrices:
//   rows_of(D, ld_d):       tile[q][j] = D[q0 + q][c0 + j]  (D row-major)
//   columns_of(D, ld_d):    tile[q][j] = D[c0 + j][q0 + q]  (D transposed)
struct RowsOf {
  const float* D;
  int64_t ld_d;
  void operator()(int64_t q0, int64_t qlen, int64_t c0, int64_t clen, float* tile,
                  int64_t ld) const {
    for (int64_t q = 0; q < qlen; ++q) {
      std::copy(D + (q0 + q) * ld_d + c0, D + (q0 + q) * ld_d + c0 + clen, tile + q * ld);
      std::fill(tile + q * ld + clen, tile + (q + 1) * ld, 0.0f);
    }
  }
};
struct ColumnsOf {
  const float* D;
  int64_t ld_d;
  void operator()(int64_t q0, int64_t qlen, int64_t c0, int64_t clen, float* tile,
                  int64_t ld) const {
    for (int64_t q = 0; q < qlen; ++q) {
      for (int64_t j = 0; j < clen; ++j) tile[q * ld + j] = D[(c0 + j) * ld_d + q0 + q];
      std::fill(tile + q * ld + clen, tile + (q + 1) * ld, 0.0f);
    }
  }
};

// tile[rr][j] = D[r0 + rr][c0 + j] for a row-major T matrix D (a dense B of the driver,
// converted to fp32 on the way).
template <typename T>
struct RowsOfT {
  const T* D;
  int64_t ld_d;
  void operator()(int64_t r0, int64_t rlen, int64_t c0, int64_t clen, float* tile,
                  int64_t ld) const {
    for (int64_t rr = 0; rr < rlen; ++rr) {
      const T* src = D + (r0 + rr) * ld_d + c0;
      float* dst = tile + rr * ld;
      for (int64_t j = 0; j < clen; ++j) dst[j] = detail::to_float(src[j]);
      std::fill(dst + clen, dst + ld, 0.0f);
    }
  }
};

// out[i][j] (row stride ld_out) = acc, or out[j][i] when `transposed`, rounded once to T.
template <typename T>
struct StoreDense {
  T* out;
  int64_t ld_out;
  bool transposed = false;
  void operator()(const OutputTile& t, const float* acc) const {
    for (int64_t i = 0; i < t.mlen; ++i) {
      for (int64_t j = 0; j < t.clen; ++j) {
        const int64_t row = t.m0 + i, col = t.c0 + j;
        const int64_t at = transposed ? col * ld_out + row : row * ld_out + col;
        out[at] = detail::from_float<T>(acc[i * t.ld + j]);
      }
    }
  }
};

template <typename T>
void forward(const Lora4bitForwardParams& p) {
  const Weight4bit& w = p.weight;
  const int64_t M = p.M, N = w.N, K = w.K, r = p.r;
  const float s = static_cast<float>(p.scaling);
  const T* x = static_cast<const T*>(p.x);
  const T* x_lora = p.x_lora ? static_cast<const T*>(p.x_lora) : x;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);

  // XA = X_l A^T: the driver with A's rows as output columns (B[k][q] = A[q][k]). The
  // rounded XA goes out for the backward; s * XA stays in fp32 for the epilogue.
  const std::vector<float> a32 = to_fp32<T>(p.lora_a, r * K);
  std::vector<float> sxa(static_cast<size_t>(M * r));
  detail::blocked_product(x_lora, M, K, r, ColumnsOf{a32.data(), K}, [&](const OutputTile& t,
                                                                         const float* acc) {
    for (int64_t i = 0; i < t.mlen; ++i) {
      for (int64_t j = 0; j < t.clen; ++j) {
        const float v = acc[i * t.ld + j];
        const int64_t at = (t.m0 + i) * r + t.c0 + j;
        static_cast<T*>(p.xa)[at] = detail::from_float<T>(v);
        sxa[at] = s * v;
      }
    }
  });
  if (N == 0) return;

  const std::vector<float> b32 = to_fp32<T>(p.lora_b, N * r);
  const float* code = codebook_4bit(w.quant_type).data();
  if (M <= detail::gemv_max_rows<T>()) {
    detail::gemv_forward(w, code, x, M, y, [&](int64_t m, int64_t n) {
      float v = bias ? detail::to_float(bias[n]) : 0.0f;
      for (int64_t q = 0; q < r; ++q) v += sxa[m * r + q] * b32[n * r + q];
      return v;
    });
    return;
  }
  const detail::StoreTile<T> store{bias, y, N};
  const auto b_columns = [&](int64_t c0, int64_t clen, float* tile, int64_t ld) {
    ColumnsOf{b32.data(), r}(0, r, c0, clen, tile, ld);
  };
  detail::blocked_forward(
      w, code, x, M,
      [&](const OutputTile& t, float* acc) {
        add_low_rank(t, acc, sxa.data() + t.m0 * r, r, b_columns);
        store(t, acc);
      },
      M * N * r);
}

template <typename T>
void backward(const Lora4bitBackwardParams& p) {
  const Weight4bit& w = p.weight;
  const int64_t M = p.M, N = w.N, K = w.K, r = p.r;
  const float s = static_cast<float>(p.scaling);
  const T* dy = static_cast<const T*>(p.grad_output);
  const bool adapter_into_dx = p.grad_input && !p.separate_lora_input;
  const bool need_g = adapter_into_dx || p.grad_input_lora || p.grad_a;

  // G = s dY B, fp32 [M, r]: the blocked driver with B's rows as the dense B tile.
  std::vector<float> g;
  if (need_g) {
    const std::vector<float> b32 = to_fp32<T>(p.lora_b, N * r);
    g.assign(static_cast<size_t>(M * r), 0.0f);
    detail::blocked_product(dy, M, N, r, RowsOf{b32.data(), r},
                            [&](const OutputTile& t, const float* acc) {
                              for (int64_t i = 0; i < t.mlen; ++i) {
                                for (int64_t j = 0; j < t.clen; ++j) {
                                  g[(t.m0 + i) * r + t.c0 + j] = s * acc[i * t.ld + j];
                                }
                              }
                            });
  }
  const std::vector<float> a32 =
      (adapter_into_dx || p.grad_input_lora) ? to_fp32<T>(p.lora_a, r * K) : std::vector<float>();

  if (p.grad_input && M > 0 && K > 0) {
    const float* code = codebook_4bit(w.quant_type).data();
    const detail::StoreTile<T> store{nullptr, static_cast<T*>(p.grad_input), K};
    if (adapter_into_dx) {
      // [dY, G] @ [deq(W); A]: the 4-bit reduction, then r more rows of A in the finish.
      const auto a_rows = [&](int64_t c0, int64_t clen, float* tile, int64_t ld) {
        RowsOf{a32.data(), K}(0, r, c0, clen, tile, ld);
      };
      detail::blocked_grad_input(
          w, code, dy, M,
          [&](const OutputTile& t, float* acc) {
            add_low_rank(t, acc, g.data() + t.m0 * r, r, a_rows);
            store(t, acc);
          },
          M * K * r);
    } else {
      detail::blocked_grad_input(w, code, dy, M, store);
    }
  }
  if (p.grad_input_lora && M > 0 && K > 0) {
    // dX_l = G A: the driver with G as activations (fp32, in place) and A's rows as B.
    detail::blocked_product(g.data(), M, r, K, RowsOf{a32.data(), K},
                            detail::StoreTile<T>{nullptr, static_cast<T*>(p.grad_input_lora), K});
  }
  if (p.grad_a && K > 0) {
    // dA = G^T X_l: rows = r, reduction over M, X_l's rows as B.
    std::vector<float> gt(static_cast<size_t>(r * M));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t q = 0; q < r; ++q) gt[q * M + m] = g[m * r + q];
    }
    detail::blocked_product(gt.data(), r, M, K, RowsOfT<T>{static_cast<const T*>(p.x_lora), K},
                            StoreDense<T>{static_cast<T*>(p.grad_a), K});
  }
  if (p.grad_b && N > 0) {
    // dB^T = (s XA)^T dY: rows = r, reduction over M, dY's rows as B; stored transposed.
    const T* xa = static_cast<const T*>(p.xa);
    std::vector<float> sxa_t(static_cast<size_t>(r * M));
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t q = 0; q < r; ++q) sxa_t[q * M + m] = s * detail::to_float(xa[m * r + q]);
    }
    StoreDense<T> store{static_cast<T*>(p.grad_b), r};
    store.transposed = true;
    detail::blocked_product(sxa_t.data(), r, M, N, RowsOfT<T>{dy, N}, store);
  }
}

}  // namespace

void lora_4bit_forward(const Lora4bitForwardParams& p) {
  validate(p);
  if (p.M == 0) return;
  detail::dispatch_dtype(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}

void lora_4bit_backward(const Lora4bitBackwardParams& p) {
  validate(p);
  detail::dispatch_dtype(p.dtype, [&](auto tag) { backward<decltype(tag)>(p); });
}

}  // namespace fourbit
