// Optimizer and page-manager ops of torch.ops.fourbit: their schemas (declared here, once),
// the argument checks shared by every device, the CPU impls and the device-independent
// page-manager ops. CUDA impls: optim_ops_cuda.cpp; fake kernels: fourbit/optim/_fake.py.
//
// adamw_step takes a whole parameter group as lists; tensor i uses 8-bit states when
// state1[i] is uint8, and then its absmax buffers are absmax1[j] / absmax2[j], j counting
// only the 8-bit tensors before it (the lists hold exactly one entry per 8-bit tensor).
#include "optim_ops.h"

#include <cstdio>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "checks.h"
#include "fourbit/error.h"
#include "fourbit/paging.h"

namespace fourbit {
namespace binding {
namespace {

#define OPTIM_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "adamw_step: ", __VA_ARGS__)

std::string at_index(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

DType param_dtype(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: break;
  }
  OPTIM_CHECK(false, name, " must be torch.float32, torch.float16 or torch.bfloat16, got ", t.scalar_type());
  return DType::Float32;
}

void check_like(const at::Tensor& t, const std::string& name, const at::Tensor& param,
                const std::string& param_name, int64_t numel) {
  OPTIM_CHECK(t.device() == param.device(), name, " is on ", t.device(), " but ", param_name, " is on ",
              param.device());
  OPTIM_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  OPTIM_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

// The 8-bit maps must be sorted ascending (the nearest-code search relies on it). The core
// checks a host map itself; a device map is read back here, once per tensor and version
// (a read-back waits for the stream, too slow for every step).
void check_sorted_map(const at::Tensor& q, const char* name) {
  if (q.is_cpu()) return;
  using Seen = std::pair<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>, uint32_t>;
  static std::mutex mutex;
  static std::vector<Seen> seen;
  const uint32_t version = q.unsafeGetTensorImpl()->version_counter().current_version();
  std::lock_guard<std::mutex> lock(mutex);
  for (const Seen& s : seen) {
    if (s.second == version && s.first.lock().get() == q.unsafeGetTensorImpl()) return;
  }
  const at::Tensor lo = q.narrow(0, 0, q.numel() - 1), hi = q.narrow(0, 1, q.numel() - 1);
  const at::Tensor bad = (hi < lo).logical_or_(hi.isnan()).logical_or_(lo.isnan());
  if (bad.any().item<bool>()) {
    const int64_t k = bad.nonzero().select(1, 0)[0].item<int64_t>();
    OPTIM_CHECK(false, name, " must be sorted ascending, but ", name, "[", k, "] = ",
                q[k].item<float>(), " > ", name, "[", k + 1, "] = ", q[k + 1].item<float>());
  }
  constexpr size_t kMaxSeen = 16;  // a few optimizers, two maps per device each
  if (seen.size() >= kMaxSeen) seen.erase(seen.begin());
  seen.emplace_back(q.getIntrusivePtr(), version);
}

}  // namespace

void run_optim_core(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.kind() == Error::Kind::InvalidArgument) TORCH_CHECK_VALUE(false, e.what());
    TORCH_CHECK(false, e.what());
  }
}

AdamWTable build_adamw_table(at::TensorList params, at::TensorList grads, at::TensorList state1,
                             at::TensorList state2, at::TensorList absmax1,
                             at::TensorList absmax2, const at::Tensor& qmap1,
                             const at::Tensor& qmap2, at::IntArrayRef steps, double lr,
                             double beta1, double beta2, double eps, double weight_decay) {
  const size_t n = params.size();
  OPTIM_CHECK(grads.size() == n, "grads has ", grads.size(), " tensors but params has ", n);
  OPTIM_CHECK(state1.size() == n, "state1 has ", state1.size(), " tensors but params has ", n);
  OPTIM_CHECK(state2.size() == n, "state2 has ", state2.size(), " tensors but params has ", n);
  OPTIM_CHECK(steps.size() == n, "steps has ", steps.size(), " entries but params has ", n);
  OPTIM_CHECK(absmax1.size() == absmax2.size(), "absmax1 has ", absmax1.size(),
              " tensors but absmax2 has ", absmax2.size());
  AdamWTable table;
  table.tensors.resize(n);
  size_t j8 = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string pname = at_index("params", i);
    AdamWTensor& t = table.tensors[i];
    t.dtype = param_dtype(p, pname);
    OPTIM_CHECK(p.device() == params[0].device(), pname, " is on ", p.device(), " but params[0] is on ",
                params[0].device());
    OPTIM_CHECK(p.is_contiguous(), pname, " must be contiguous, got strides ", p.strides());
    const int64_t numel = p.numel();
    const at::Tensor& g = grads[i];
    OPTIM_CHECK(g.scalar_type() == p.scalar_type(), at_index("grads", i), " has dtype ", g.scalar_type(),
                " but ", pname, " has dtype ", p.scalar_type());
    check_like(g, at_index("grads", i), p, pname, numel);
    const at::Tensor& s1 = state1[i];
    const at::Tensor& s2 = state2[i];
    OPTIM_CHECK(s1.scalar_type() == at::kFloat || s1.scalar_type() == at::kByte, at_index("state1", i),
                " must be torch.float32 (32-bit states) or torch.uint8 (8-bit states), got ",
                s1.scalar_type());
    OPTIM_CHECK(s2.scalar_type() == s1.scalar_type(), at_index("state2", i), " has dtype ",
                s2.scalar_type(), " but ", at_index("state1", i), " has dtype ", s1.scalar_type());
    check_like(s1, at_index("state1", i), p, pname, numel);
    check_like(s2, at_index("state2", i), p, pname, numel);
    t.param = p.data_ptr();
    t.grad = g.const_data_ptr();
    t.state1 = s1.data_ptr();
    t.state2 = s2.data_ptr();
    t.numel = numel;
    t.step = steps[i];
    if (s1.scalar_type() == at::kByte) {
      t.bits = StateBits::Bits8;
      OPTIM_CHECK(j8 < absmax1.size(), "absmax1 has ", absmax1.size(),
                  " tensors but state1 has more uint8 (8-bit) tensors than that");
      const int64_t blocks = (numel + kAdamW8bitBlocksize - 1) / kAdamW8bitBlocksize;
      for (const auto& [list, name] : {std::pair{absmax1, "absmax1"}, std::pair{absmax2, "absmax2"}}) {
        const at::Tensor& a = list[j8];
        OPTIM_CHECK(a.scalar_type() == at::kFloat, at_index(name, j8), " must be torch.float32, got ",
                    a.scalar_type());
        check_like(a, at_index(name, j8), p, pname, blocks);
      }
      t.absmax1 = absmax1[j8].data_ptr<float>();
      t.absmax2 = absmax2[j8].data_ptr<float>();
      ++j8;
    } else {
      t.bits = StateBits::Bits32;
    }
  }
  OPTIM_CHECK(j8 == absmax1.size(), "absmax1 has ", absmax1.size(), " tensors but state1 has ", j8,
              " uint8 (8-bit) tensors");
  if (j8 > 0) {
    for (const auto& [q, name] : {std::pair{qmap1, "qmap1"}, std::pair{qmap2, "qmap2"}}) {
      OPTIM_CHECK(q.scalar_type() == at::kFloat, name, " must be torch.float32, got ", q.scalar_type());
      OPTIM_CHECK(q.numel() == 256, name, " must have 256 elements, got ", q.numel());
      OPTIM_CHECK(q.device() == params[0].device(), name, " is on ", q.device(), " but params[0] is on ",
                  params[0].device());
      OPTIM_CHECK(q.is_contiguous(), name, " must be contiguous");
      check_sorted_map(q, name);
    }
    table.params.qmap1 = qmap1.const_data_ptr<float>();
    table.params.qmap2 = qmap2.const_data_ptr<float>();
  }
  table.params.tensors = table.tensors.data();
  table.params.num_tensors = static_cast<int64_t>(n);
  table.params.hyper.lr = lr;
  table.params.hyper.beta1 = beta1;
  table.params.hyper.beta2 = beta2;
  table.params.hyper.eps = eps;
  table.params.hyper.weight_decay = weight_decay;
  return table;
}

namespace {

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1,
                    at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                    const at::Tensor& qmap1, const at::Tensor& qmap2, at::IntArrayRef steps,
                    double lr, double beta1, double beta2, double eps, double weight_decay) {
  if (!params.empty()) {
    TORCH_CHECK_VALUE(params[0].device().is_cpu(), "adamw_step: params[0] must be on the CPU for the CPU "
                      "kernel, got ", params[0].device());
  }
  AdamWTable table = build_adamw_table(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                       steps, lr, beta1, beta2, eps, weight_decay);
  run_optim_core([&] { adamw_step(table.params); });
}

int page_device(const c10::Device& device) {
  if (device.is_cpu()) return kHostDevice;
  TORCH_CHECK_VALUE(device.is_cuda(), "device must be cpu or cuda, got ", device);
  if (device.has_index()) return device.index();
  // A bare "cuda" is torch's current device, not device 0.
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice().index();
}

// Zero-filled tensor on a page-manager buffer: managed memory on a CUDA device, plain
// host memory on the CPU. The tensor frees the buffer when its storage dies.
at::Tensor paged_zeros(at::IntArrayRef size, at::ScalarType dtype, c10::Device device) {
  const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t numel = checked_numel(size, "paged_zeros: size", itemsize);
  const int dev = page_device(device);
  const int64_t bytes = numel * itemsize;
  void* ptr = nullptr;
  run_optim_core([&] { ptr = PageManager::instance().allocate(bytes, dev); });
  const c10::Device where = dev == kHostDevice ? c10::Device(c10::kCPU) : c10::Device(c10::kCUDA, dev);
  // The deleter runs inside a destructor, where an escaping exception is std::terminate: a
  // failed free (a sticky error of an earlier kernel, a driver shutting down) is reported only.
  return at::from_blob(
      ptr, size,
      [](void* p) {
        try {
          PageManager::instance().release(p);
        } catch (const std::exception& e) {
          std::fprintf(stderr, "fourbit: freeing a paged buffer failed: %s\n", e.what());
        }
      },
      at::TensorOptions().dtype(dtype).device(where));
}

std::vector<int64_t> paged_memory_info(c10::Device device) {
  MemoryInfo info;
  run_optim_core([&] { info = memory_info(page_device(device)); });
  return {info.free_bytes, info.total_bytes};
}

std::vector<int64_t> paged_stats() {
  auto& pm = PageManager::instance();
  return {pm.num_buffers(), pm.bytes_allocated()};
}

// Host buffers never move: prefetching CPU tensors only checks the target.
void paged_prefetch_cpu(at::TensorList tensors, c10::Device device) { page_device(device); }

}  // namespace
}  // namespace binding
}  // namespace fourbit

TORCH_LIBRARY_FRAGMENT(fourbit, m) {
  // One AdamW step of a whole parameter group (see the file comment for the 8-bit layout).
  m.def("adamw_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2,"
        " Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, int[] steps,"
        " float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  // The page manager: zero-filled paged buffers, prefetch (device "cpu" = evict to the
  // host), free/total memory of a device, and [buffers, bytes] currently allocated.
  m.def("paged_zeros(int[] size, ScalarType dtype, Device device) -> Tensor");
  m.def("paged_prefetch(Tensor[] tensors, Device device) -> ()");
  m.def("paged_memory_info(Device device) -> int[]");
  m.def("paged_stats() -> int[]");
  m.impl("paged_zeros", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(fourbit::binding::paged_zeros));
  m.impl("paged_memory_info", c10::DispatchKey::CompositeExplicitAutograd,
         TORCH_FN(fourbit::binding::paged_memory_info));
  m.impl("paged_stats", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(fourbit::binding::paged_stats));
}

TORCH_LIBRARY_IMPL(fourbit, CPU, m) {
  m.impl("adamw_step", TORCH_FN(fourbit::binding::adamw_step_cpu));
  m.impl("paged_prefetch", TORCH_FN(fourbit::binding::paged_prefetch_cpu));
}
