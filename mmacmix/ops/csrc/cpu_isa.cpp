// Which compiled variant of the local-attention kernel runs: the widest
// instruction set that this build holds and this CPU supports, unless
// set_cpu_isa (MMACMIX_CPU_ISA, read by mmacmix/ops/native.py) asks for a
// narrower one.
#include "common.h"

#include <atomic>
#include <stdexcept>

namespace mmacmix {
namespace {

bool cpu_has(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
#if MMACMIX_X86_TARGETS
    // __builtin_cpu_supports also checks that the OS saves the wide
    // registers (XGETBV), so a CPU feature hidden by the OS counts as absent.
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      return cpu_has(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
#endif
    default:
      return false;
  }
}

constexpr CpuIsa kAllIsas[] = {CpuIsa::kBaseline, CpuIsa::kAvx2,
                               CpuIsa::kAvx512};

CpuIsa widest_supported() {
  CpuIsa widest = CpuIsa::kBaseline;
  for (CpuIsa isa : kAllIsas) {
    if (cpu_has(isa)) widest = isa;
  }
  return widest;
}

std::atomic<int>& active() {
  static std::atomic<int> isa{static_cast<int>(widest_supported())};
  return isa;
}

}  // namespace

CpuIsa active_cpu_isa() {
  return static_cast<CpuIsa>(active().load(std::memory_order_relaxed));
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    default:
      return "baseline";
  }
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> names;
  for (CpuIsa isa : kAllIsas) {
    if (cpu_has(isa)) names.emplace_back(cpu_isa_name(isa));
  }
  return names;
}

std::string set_cpu_isa(const std::string& name) {
  CpuIsa chosen;
  if (name == "auto") {
    chosen = widest_supported();
  } else {
    bool known = false;
    for (CpuIsa isa : kAllIsas) {
      if (name == cpu_isa_name(isa)) {
        chosen = isa;
        known = true;
      }
    }
    std::string supported;
    for (const std::string& s : supported_cpu_isas()) {
      supported += (supported.empty() ? "" : ", ") + s;
    }
    if (!known) {
      throw std::invalid_argument("unknown instruction set '" + name +
                                  "': expected auto, avx512, avx2 or "
                                  "baseline");
    }
    if (!cpu_has(chosen)) {
      throw std::invalid_argument("instruction set '" + name +
                                  "' is not supported by this CPU and "
                                  "build; supported: " +
                                  supported);
    }
  }
  active().store(static_cast<int>(chosen), std::memory_order_relaxed);
  return cpu_isa_name(chosen);
}

}  // namespace mmacmix
