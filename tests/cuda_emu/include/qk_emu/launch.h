// Kernel launches: build.py rewrites `kernel<<<grid, block, shared, stream>>>(args)` into
// `::qk_emu::launch(__FILE__, __LINE__, "kernel", &kernel, grid, block, shared, stream)(args)`.
// Arguments are converted to the kernel's parameter types once, at the launch, as CUDA does, and
// every emulated thread calls the kernel with its own copies.
#pragma once
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime_api.h"
#include "types.h"

namespace qk_emu {

struct LaunchSpec {
  const char* file;
  int line;
  const char* kernel;
  const void* address;
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
  cudaStream_t stream;
};

// Runs the grid on the calling OS thread (or on worker threads, see QK_EMU_WORKERS). A bad
// configuration sets the CUDA error a real launch would (read it with cudaGetLastError); a fault in
// device code (deadlock, a warp intrinsic misused, an exception) throws std::runtime_error naming
// the kernel, the launch site, the block and the threads' file:line.
void run_grid(const LaunchSpec& spec, void (*thread_main)(void*), void* closure);

inline dim3 to_dim3(dim3 d) { return d; }
inline dim3 to_dim3(uint3 d) { return dim3(d); }
template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
dim3 to_dim3(I n) {
  return dim3((unsigned int)n);  // the implicit conversion a real launch applies
}

template <class... P>
class Launch {
 public:
  Launch(const LaunchSpec& spec, void (*kernel)(P...)) : spec_(spec), kernel_(kernel) {}

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "qk_emu: kernel launched with the wrong number of arguments");
    struct Closure {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    };
    Closure closure{kernel_, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_grid(spec_, [](void* c) {
      Closure* cl = static_cast<Closure*>(c);
      std::apply(cl->kernel, cl->args);
    }, &closure);
  }

 private:
  LaunchSpec spec_;
  void (*kernel_)(P...);
};

template <class... P, class G, class B>
Launch<P...> launch(const char* file, int line, const char* name, void (*kernel)(P...), G grid, B block,
                    size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return Launch<P...>(LaunchSpec{file, line, name, reinterpret_cast<const void*>(kernel), to_dim3(grid),
                                 to_dim3(block), shared_bytes, stream},
                      kernel);
}

template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_memory());
}

}  // namespace qk_emu

// `extern __shared__ T name[];` is rewritten by build.py into this (at block scope).
#define QK_EMU_EXTERN_SHARED(T, name) T* name = ::qk_emu::dynamic_shared<T>()
