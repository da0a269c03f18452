// Feature probe for the CUDA build: what was compiled in, and whether a device
// can be used at run time. Loading the module never needs a driver; these
// functions report the driver's answer instead of failing.
#pragma once

#include <string>

namespace kvttl::cuda {

// CUDART_VERSION the module was built against (e.g. 13000).
int runtime_version_built();

// Number of usable devices; 0 with *error set when the driver or device is
// missing ("CUDA driver version is insufficient", "no CUDA-capable device").
int device_count(std::string* error);

}  // namespace kvttl::cuda
