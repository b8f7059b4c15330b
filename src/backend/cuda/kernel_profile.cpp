#include "backend/cuda/kernel_profile.h"

#include <cupti_activity.h>
#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

namespace pgolf::cuda {
namespace {

struct CuptiApi {
  void* lib = nullptr;
  CUptiResult (*enable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*disable)(CUpti_ActivityKind) = nullptr;
  CUptiResult (*register_callbacks)(CUpti_BuffersCallbackRequestFunc, CUpti_BuffersCallbackCompleteFunc) = nullptr;
  CUptiResult (*flush_all)(uint32_t) = nullptr;
  CUptiResult (*next_record)(uint8_t*, size_t, CUpti_Activity**) = nullptr;
};

CuptiApi& api() {
  static CuptiApi a;
  return a;
}

std::mutex& records_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, KernelTime>& records() {
  static std::map<std::string, KernelTime> r;
  return r;
}
// Every recorded piece of work (kernels, copies, memsets) as [start, end) in ns, for the idle time.
struct Interval {
  uint64_t start, end;
  std::string name;
};
std::vector<Interval>& intervals() {
  static std::vector<Interval> v;
  return v;
}

const char* copy_name(uint8_t kind) {
  switch (kind) {
    case CUPTI_ACTIVITY_MEMCPY_KIND_HTOD: return "memcpy HtoD";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOH: return "memcpy DtoH";
    case CUPTI_ACTIVITY_MEMCPY_KIND_DTOD: return "memcpy DtoD";
    default: return "memcpy";
  }
}

// Sorted by start: the stretches where no interval is running, summed by the pair around them.
IdleSummary idle_of(std::vector<Interval> v) {
  IdleSummary out;
  if (v.empty()) return out;
  std::sort(v.begin(), v.end(), [](const Interval& a, const Interval& b) { return a.start < b.start; });
  std::map<std::pair<std::string, std::string>, IdleGap> by_pair;
  uint64_t busy_end = v[0].end;
  const std::string* last = &v[0].name;
  for (size_t i = 1; i < v.size(); ++i) {
    if (v[i].start > busy_end) {
      const double ns = static_cast<double>(v[i].start - busy_end);
      IdleGap& g = by_pair[{*last, v[i].name}];
      g.total_ms += ns * 1e-6;
      g.max_us = std::max(g.max_us, ns * 1e-3);
      ++g.count;
      out.total_ms += ns * 1e-6;
      ++out.gaps;
    }
    if (v[i].end >= busy_end) busy_end = v[i].end, last = &v[i].name;
  }
  std::map<std::pair<std::string, std::string>, IdleGap> by_category;
  for (auto& [key, g] : by_pair) {
    g.before = key.first;
    g.after = key.second;
    out.pairs.push_back(g);
    IdleGap& c = by_category[{kernel_category(key.first), kernel_category(key.second)}];
    c.total_ms += g.total_ms;
    c.max_us = std::max(c.max_us, g.max_us);
    c.count += g.count;
  }
  for (auto& [key, g] : by_category) {
    g.before = key.first;
    g.after = key.second;
    out.categories.push_back(g);
  }
  const auto largest = [](const IdleGap& a, const IdleGap& b) { return a.total_ms > b.total_ms; };
  std::sort(out.pairs.begin(), out.pairs.end(), largest);
  std::sort(out.categories.begin(), out.categories.end(), largest);
  return out;
}

// Demangled, without the parameter list and template arguments: "pgolf::cuda::(anon)::rmsnorm_forward_kernel".
std::string short_name(const char* mangled) {
  int status = 0;
  char* demangled = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string s = status == 0 && demangled ? demangled : mangled;
  std::free(demangled);
  std::string out;
  int depth = 0;
  for (char c : s) {
    if (c == '<' || c == '(') ++depth;
    if (depth == 0) out += c;
    if ((c == '>' || c == ')') && depth > 0) --depth;
  }
  for (const std::string& prefix : {std::string("void "), std::string("pgolf::cuda::"), std::string("(anonymous namespace)::")})
    for (size_t at; (at = out.find(prefix)) != std::string::npos;) out.erase(at, prefix.size());
  return out.size() > 72 ? out.substr(0, 72) : out;
}

void CUPTIAPI buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  constexpr size_t kBytes = size_t{8} << 20;
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(8, kBytes));
  *size = kBytes;
  *max_records = 0;
}

void CUPTIAPI buffer_completed(CUcontext, uint32_t, uint8_t* buffer, size_t, size_t valid) {
  CUpti_Activity* record = nullptr;
  std::lock_guard<std::mutex> lock(records_mutex());
  while (api().next_record(buffer, valid, &record) == CUPTI_SUCCESS) {
    if (record->kind == CUPTI_ACTIVITY_KIND_MEMCPY) {
      const auto* c = reinterpret_cast<const CUpti_ActivityMemcpy6*>(record);
      intervals().push_back({c->start, c->end, copy_name(c->copyKind)});
      continue;
    }
    if (record->kind == CUPTI_ACTIVITY_KIND_MEMSET) {
      const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(record);
      intervals().push_back({m->start, m->end, "memset"});
      continue;
    }
    if (record->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL && record->kind != CUPTI_ACTIVITY_KIND_KERNEL) continue;
    const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(record);
    std::string name = short_name(k->name);
    KernelTime& t = records()[name];
    t.total_ms += static_cast<double>(k->end - k->start) * 1e-6;
    ++t.calls;
    intervals().push_back({k->start, k->end, std::move(name)});
  }
  std::free(buffer);
}

template <typename F>
bool load(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  return fn != nullptr;
}

}  // namespace

bool KernelProfile::start() {
  CuptiApi& a = api();
  if (!a.lib) {
    for (const char* name : {"libcupti.so", "libcupti.so.13", "/usr/local/cuda/lib64/libcupti.so",
                             "/usr/local/cuda/extras/CUPTI/lib64/libcupti.so"})
      if ((a.lib = dlopen(name, RTLD_NOW)) != nullptr) break;
    if (!a.lib) {
      why_ = "libcupti could not be loaded";
      return false;
    }
    if (!load(a.lib, "cuptiActivityEnable", a.enable) || !load(a.lib, "cuptiActivityDisable", a.disable) ||
        !load(a.lib, "cuptiActivityRegisterCallbacks", a.register_callbacks) ||
        !load(a.lib, "cuptiActivityFlushAll", a.flush_all) ||
        !load(a.lib, "cuptiActivityGetNextRecord", a.next_record)) {
      why_ = "libcupti lacks the activity API";
      a.lib = nullptr;
      return false;
    }
    if (a.register_callbacks(buffer_requested, buffer_completed) != CUPTI_SUCCESS) {
      why_ = "cuptiActivityRegisterCallbacks failed";
      return false;
    }
  }
  records().clear();
  intervals().clear();
  idle_ = {};
  if (a.enable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) != CUPTI_SUCCESS) {
    why_ = "cuptiActivityEnable(CONCURRENT_KERNEL) failed";
    return false;
  }
  // Copies and memsets only count as busy time for the idle summary: without them it is an upper bound.
  a.enable(CUPTI_ACTIVITY_KIND_MEMCPY);
  a.enable(CUPTI_ACTIVITY_KIND_MEMSET);
  return true;
}

std::vector<KernelTime> KernelProfile::stop() {
  CuptiApi& a = api();
  a.flush_all(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  a.disable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
  a.disable(CUPTI_ACTIVITY_KIND_MEMCPY);
  a.disable(CUPTI_ACTIVITY_KIND_MEMSET);
  std::vector<KernelTime> out;
  std::lock_guard<std::mutex> lock(records_mutex());
  idle_ = idle_of(std::move(intervals()));
  intervals().clear();
  for (auto& [name, t] : records()) {
    KernelTime k = t;
    k.name = name;
    out.push_back(k);
  }
  std::sort(out.begin(), out.end(), [](const KernelTime& x, const KernelTime& y) { return x.total_ms > y.total_ms; });
  return out;
}

const char* kernel_category(const std::string& name) {
  if (name.rfind("memcpy", 0) == 0 || name == "memset") return "copy";
  for (const char* gemm : {"nvjet", "gemm", "Gemm", "cutlass", "xmma", "gemv"})
    if (name.find(gemm) != std::string::npos) return "gemm";
  if (name.find("attention") != std::string::npos) return "attention";
  return "other";
}

}  // namespace pgolf::cuda
