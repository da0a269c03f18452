#include <cuda_runtime.h>

#include "kvttl/cuda_probe.h"

namespace kvttl::cuda {

int runtime_version_built() { return CUDART_VERSION; }

int device_count(std::string* error) {
  int n = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    *error = std::string(cudaGetErrorName(rc)) + ": " + cudaGetErrorString(rc);
    cudaGetLastError();  // clear the sticky error for later calls
    return 0;
  }
  return n;
}

}  // namespace kvttl::cuda
