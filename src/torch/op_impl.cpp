// Argument checks and tensor -> params translation shared by the CPU and CUDA impls.
// Every user error is a ValueError (TORCH_CHECK_VALUE) that names the argument and value.
#include "op_impl.h"

#include "checks.h"

namespace fourbit {
namespace binding {
namespace {

void check_out(const at::Tensor& out, const at::Tensor& A, at::IntArrayRef shape,
               at::ScalarType dtype) {
  check_on_device_of(out, "out", A);
  check_dtype(out, "out", dtype);
  CHECK_ARG(out.sizes() == shape, "out must have shape ", shape, ", got ", out.sizes());
  check_contiguous(out, "out");
}

Dequantize4bitParams dequant_params(const at::Tensor& A, int64_t blocksize,
                                    const std::string& quant_type, at::IntArrayRef shape,
                                    at::ScalarType dtype, const at::Tensor& out) {
  check_blocksize(blocksize);
  Dequantize4bitParams p;
  p.quant_type = quant_type_arg(quant_type);
  p.out_dtype = to_core_dtype(dtype, "dtype");
  p.numel = checked_numel(shape);
  check_packed(A, p.numel, shape);
  check_out(out, A, shape, dtype);
  p.blocksize = blocksize;
  p.packed = static_cast<const uint8_t*>(A.const_data_ptr());
  p.out = out.mutable_data_ptr();
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const DeviceKernels& k, const at::Tensor& A_in,
                                                 int64_t blocksize, const std::string& quant_type,
                                                 at::ScalarType quant_storage) {
  check_blocksize(blocksize);
  Quantize4bitParams p;
  p.quant_type = quant_type_arg(quant_type);
  p.dtype = to_core_dtype(A_in.scalar_type(), "A.dtype");
  const at::Tensor A = A_in.contiguous();
  p.numel = A.numel();
  p.blocksize = blocksize;
  const int64_t storage_size = c10::elementSize(quant_storage);
  CHECK_ARG(storage_size <= 8 && !at::isComplexType(quant_storage), "quant_storage must be a "
            "real dtype of at most 8 bytes, got ", quant_storage);
  // Packed bytes, rounded up to whole quant_storage elements (bitsandbytes' layout).
  const int64_t bytes = (p.numel + 1) / 2;
  const int64_t storage_elems = (p.numel + 2 * storage_size - 1) / (2 * storage_size);
  at::Tensor packed = at::empty({storage_elems * storage_size}, A.options().dtype(at::kByte));
  if (storage_elems * storage_size > bytes) packed.narrow(0, bytes, storage_elems * storage_size - bytes).zero_();
  at::Tensor absmax = at::empty({num_blocks(p.numel, blocksize)}, A.options().dtype(at::kFloat));
  p.input = A.const_data_ptr();
  p.packed = packed.mutable_data_ptr<uint8_t>();
  p.absmax = absmax.mutable_data_ptr<float>();
  run_core([&] { k.quantize_4bit(p); });
  if (quant_storage != at::kByte) packed = packed.view(quant_storage);
  return {packed.view({storage_elems, 1}), absmax};
}

at::Tensor empty_dequantized(const at::Tensor& A, at::IntArrayRef shape, at::ScalarType dtype) {
  to_core_dtype(dtype, "dtype");
  // The packed bytes must cover the shape before its output is allocated (a bad shape over a
  // small buffer is an argument error, not a failed multi-terabyte allocation).
  check_packed(A, checked_numel(shape), shape);
  return at::empty(shape, A.options().dtype(dtype));
}

void dequantize_4bit_out(const DeviceKernels& k, const at::Tensor& A, const at::Tensor& absmax,
                         int64_t blocksize, const std::string& quant_type, at::IntArrayRef shape,
                         at::ScalarType dtype, const at::Tensor& out) {
  Dequantize4bitParams p = dequant_params(A, blocksize, quant_type, shape, dtype, out);
  check_on_device_of(absmax, "absmax", A);
  check_dtype(absmax, "absmax", at::kFloat);
  check_contiguous(absmax, "absmax");
  check_numel(absmax, "absmax", num_blocks(p.numel, blocksize), "one per block");
  p.scales.absmax = absmax.const_data_ptr<float>();
  run_core([&] { k.dequantize_4bit(p); });
}

void dequantize_4bit_nested_out(const DeviceKernels& k, const at::Tensor& A,
                                const at::Tensor& absmax, const at::Tensor& nested_absmax,
                                const at::Tensor& nested_code, const at::Tensor& offset,
                                int64_t blocksize, int64_t nested_blocksize,
                                const std::string& quant_type, at::IntArrayRef shape,
                                at::ScalarType dtype, const at::Tensor& out) {
  Dequantize4bitParams p = dequant_params(A, blocksize, quant_type, shape, dtype, out);
  check_blocksize(nested_blocksize, "nested_blocksize");
  const int64_t blocks = num_blocks(p.numel, blocksize);
  const struct { const at::Tensor& t; const char* name; at::ScalarType dtype; int64_t numel;
                 const char* why; } args[] = {
      {absmax, "absmax", at::kByte, blocks, "one uint8 per block when nested"},
      {nested_absmax, "nested_absmax", at::kFloat, num_blocks(blocks, nested_blocksize),
       "one per nested block"},
      {nested_code, "nested_code", at::kFloat, kDynamicMapSize, "the 8-bit dynamic map"},
      {offset, "offset", at::kFloat, 1, "the mean subtracted from absmax"},
  };
  for (const auto& a : args) {
    check_on_device_of(a.t, a.name, A);
    check_dtype(a.t, a.name, a.dtype);
    check_contiguous(a.t, a.name);
    check_numel(a.t, a.name, a.numel, a.why);
  }
  p.scales.absmax_q = absmax.const_data_ptr<uint8_t>();
  p.scales.nested_absmax = nested_absmax.const_data_ptr<float>();
  p.scales.nested_code = nested_code.const_data_ptr<float>();
  p.scales.offset = offset.const_data_ptr<float>();
  p.scales.nested_blocksize = nested_blocksize;
  run_core([&] { k.dequantize_4bit(p); });
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const DeviceKernels& k,
                                                      const at::Tensor& A_in,
                                                      const at::Tensor& code, int64_t blocksize) {
  check_blocksize(blocksize);
  QuantizeBlockwiseParams p;
  p.dtype = to_core_dtype(A_in.scalar_type(), "A.dtype");
  check_on_device_of(code, "code", A_in);
  check_dtype(code, "code", at::kFloat);
  check_contiguous(code, "code");
  check_numel(code, "code", kDynamicMapSize, "a 256-entry map");
  const at::Tensor A = A_in.contiguous();
  p.numel = A.numel();
  p.blocksize = blocksize;
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({num_blocks(p.numel, blocksize)}, A.options().dtype(at::kFloat));
  p.input = A.const_data_ptr();
  p.code = code.const_data_ptr<float>();
  p.out = out.mutable_data_ptr<uint8_t>();
  p.absmax = absmax.mutable_data_ptr<float>();
  run_core([&] { k.quantize_blockwise(p); });
  return {out, absmax};
}

at::Tensor dequantize_blockwise(const DeviceKernels& k, const at::Tensor& A,
                                const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, at::ScalarType dtype) {
  check_blocksize(blocksize);
  DequantizeBlockwiseParams p;
  p.out_dtype = to_core_dtype(dtype, "dtype");
  check_dtype(A, "A", at::kByte);
  check_contiguous(A, "A");
  p.numel = A.numel();
  p.blocksize = blocksize;
  check_on_device_of(absmax, "absmax", A);
  check_dtype(absmax, "absmax", at::kFloat);
  check_contiguous(absmax, "absmax");
  check_numel(absmax, "absmax", num_blocks(p.numel, blocksize), "one per block");
  check_on_device_of(code, "code", A);
  check_dtype(code, "code", at::kFloat);
  check_contiguous(code, "code");
  check_numel(code, "code", kDynamicMapSize, "a 256-entry map");
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  p.input = A.const_data_ptr<uint8_t>();
  p.code = code.const_data_ptr<float>();
  p.absmax = absmax.const_data_ptr<float>();
  p.out = out.mutable_data_ptr();
  run_core([&] { k.dequantize_blockwise(p); });
  return out;
}

}  // namespace binding
}  // namespace fourbit
