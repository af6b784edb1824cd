// Shared by the compiled CPU kernels: instruction-set dispatch, inlining
// and the entry points that bindings.cpp exposes to Python.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

// The hot loops are compiled for several instruction sets and one is picked
// at load time, so a portable build still runs at full width on AVX-512 or
// AVX2 machines.  GCC 12 is the first to dispatch on x86-64 feature levels.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    defined(__x86_64__) && defined(__linux__) && !defined(MMACMIX_NO_CLONES)
#define MMACMIX_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMACMIX_CLONES
#endif

// The local-attention kernel is compiled once per instruction set below and
// picked at run time (cpu_isa.cpp), so that MMACMIX_CPU_ISA can force a
// narrower one for testing and measuring.  Each variant asks only for the
// features it uses (not a whole x86-64-v3/v4 level, which also needs MOVBE,
// XSAVE, ... that some virtual machines hide).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define MMACMIX_X86_TARGETS 1
#define MMACMIX_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MMACMIX_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))
#else
#define MMACMIX_X86_TARGETS 0
#endif

// Everything a clone calls must be inlined into it: an out-of-line copy
// (lambdas included) would be compiled for the baseline instruction set.
#if defined(__GNUC__)
#define MMACMIX_INLINE inline __attribute__((always_inline))
#define MMACMIX_LAMBDA __attribute__((always_inline))
#define MMACMIX_RESTRICT __restrict__
#else
#define MMACMIX_INLINE inline
#define MMACMIX_LAMBDA
#define MMACMIX_RESTRICT __restrict
#endif

namespace mmacmix {

// Instruction sets of the local-attention kernel, narrowest first.
// kBaseline is the compiler's default target (SSE2 on x86-64).
enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The one the kernels run: the widest this CPU and build support, or the
// one set_cpu_isa chose.
CpuIsa active_cpu_isa();
// "baseline", "avx2" or "avx512".
const char* cpu_isa_name(CpuIsa isa);
// Names of the instruction sets this build and CPU can run, narrowest first.
std::vector<std::string> supported_cpu_isas();
// Selects an instruction set by name ("auto": the widest supported);
// returns the name of the one now active.  Throws std::invalid_argument,
// with what is accepted, for an unknown or unsupported name.
std::string set_cpu_isa(const std::string& name);

// ACmix's sliding-window local attention (local_attention.cpp).
std::vector<at::Tensor> local_attention_forward(const at::Tensor& q,
                                                const at::Tensor& k,
                                                const at::Tensor& v,
                                                int64_t kernel_size,
                                                int64_t stride);
std::vector<at::Tensor> local_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, int64_t kernel_size,
    int64_t stride);

// X-volution's weighted pixel shift products (pixel_shift.cpp), computed
// in tiles of about `tile_positions` output pixels and blocks of channels
// whose products take about `block_bytes`.
at::Tensor pixel_shift_forward(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& base,
                               int64_t distance, int64_t stride,
                               int64_t tile_positions,
                               int64_t block_bytes);
std::vector<at::Tensor> pixel_shift_backward(const at::Tensor& grad,
                                             const at::Tensor& x,
                                             const at::Tensor& weight,
                                             int64_t distance, int64_t stride,
                                             bool need_x, bool need_weight,
                                             int64_t tile_positions,
                                             int64_t block_bytes);

}  // namespace mmacmix
