// Instruction-set detection, the last error, and the threads the kernels run on (the library as a
// whole: common.h).

#include "common.h"

namespace ditq {

bool has_avx512_vnni() {
#if DITQ_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AVX-VNNI (the VEX encoding), read with cpuid once: leaf 7, subleaf 1, EAX bit 4. (Every kernel
// call asks, through detect_isa and vex_dot, and cpuid traps to the hypervisor in a VM.)
bool has_avx_vnni() {
#if DITQ_X86
  static const bool has = [] {
    unsigned a, b, c, d;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1);
  }();
  return has;
#else
  return false;
#endif
}

int64_t detect_isa() {
  static const int64_t level = [] {
#if DITQ_X86
    __builtin_cpu_init();
    if (has_avx512_vnni()) return kAvx512Vnni;
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && has_avx_vnni()) return kAvxVnni;
    if (avx2) return kAvx2;
#endif
    return kScalar;
  }();
  return level;
}

bool isa_ok(int64_t isa) { return isa >= kScalar && isa <= detect_isa(); }

thread_local std::string last_error;

}  // namespace ditq

using namespace ditq;

extern "C" {

int64_t ditq_best_isa() { return detect_isa(); }

// How many threads at::parallel_for gives `n` work items of grain 1 here: what every GEMM
// gets. A check that this library was built with OpenMP (without it, the parallel region in
// ATen's header compiles to a plain loop on the caller's thread).
int64_t ditq_threads_used(int64_t n) {
  std::mutex lock;
  std::set<std::thread::id> ids;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> guard(lock);
    ids.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(ids.size());
}

const char* ditq_last_error() { return last_error.c_str(); }

}  // extern "C"
