"""gsplat's CUDA extension, prebuilt on an identical machine and carried (benchmarks/speed_gpu.sh)."""
import importlib.machinery
import importlib.util
import os
import sys

try:
    _path = os.path.join(os.path.dirname(__file__), "gsplat_cuda.so")
    _loader = importlib.machinery.ExtensionFileLoader("gsplat_cuda", _path)
    _module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("gsplat_cuda", _path,
                                                                                     loader=_loader))
    _loader.exec_module(_module)
except Exception as e:  # gsplat then builds its extension itself
    raise ImportError(f"carried gsplat_cuda.so: {e}") from e
sys.modules[__name__] = _module
