"""TODO"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, Optional

import numpy as np
import torch


# ----------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        return __import__(mod).__version__
    except Exception:  # not installed, or broken install: record as absent rather than fail a measurement
        return None


def environment_info() -> Dict[str, Any]:
    """Hardware and software a number was measured on; attach it to every figure and table."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": _version("transformers"), "onnxruntime": _version("onnxruntime"),
        "numpy": np.__version__, "cuda": None,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {"device": p.name, "capability": f"{p.major}.{p.minor}",
                        "memory_gb": round(p.total_memory / 2 ** 30, 1), "cuda_version": torch.version.cuda}
    return info
