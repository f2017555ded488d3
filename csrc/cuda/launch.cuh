#pragma once
// Launching a kernel from a launch plan (launch_config.h): one copy for every launcher.

#include <c10/cuda/CUDAException.h>

#include "launch_config.h"

namespace bilateral_ops {
namespace cuda {

inline dim3 as_dim3(const launch::Dim3& d) {
  return dim3(static_cast<unsigned>(d.x), static_cast<unsigned>(d.y), static_cast<unsigned>(d.z));
}

}  // namespace cuda
}  // namespace bilateral_ops

// <<<grid, block, dynamic shared memory, stream>>> of a plan, then the launch check. A macro, not a
// function template: the kernel's arguments keep their exact types and the check reports the
// launcher's file and line.
#define BO_LAUNCH(kernel, plan, stream, ...)                                               \
  do {                                                                                     \
    kernel<<<::bilateral_ops::cuda::as_dim3((plan).grid),                                  \
             ::bilateral_ops::cuda::as_dim3((plan).block),                                 \
             static_cast<size_t>((plan).dynamic_smem), (stream)>>>(__VA_ARGS__);           \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                        \
  } while (0)
