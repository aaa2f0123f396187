"""What the machine has: memory and load of the host and of the model's device."""

from __future__ import annotations

import os
from typing import Any

import psutil

_GB = 1024**3


def report(device: str) -> dict[str, Any]:
    """One resources report; the top-level device/total_gb/free_gb are what old clients read."""
    memory = psutil.virtual_memory()
    process = psutil.Process(os.getpid())
    host = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "cpu_count": psutil.cpu_count(),
        "ram_total_gb": round(memory.total / _GB, 2),
        "ram_available_gb": round(memory.available / _GB, 2),
        "ram_used_gb": round((memory.total - memory.available) / _GB, 2),
        "rss_gb": round(process.memory_info().rss / _GB, 3),
    }
    return {
        "device": device,
        "total_gb": host["ram_total_gb"],
        "free_gb": host["ram_available_gb"],
        "host": host,
        "gpus": [],
    }
