"""Which machine this is: latency profiles hold only for the host they were measured on."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_host(onnxruntime_version: str, threads: int, provider: str = "CPUExecutionProvider") -> dict[str, Any]:
    """The host record a latency profile carries (manifest.json `latency.host`)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "onnxruntime": onnxruntime_version,
        "provider": provider,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


HOST_KEYS = ("cpu", "cores", "onnxruntime", "provider")  # what makes two hosts time alike


def host_differences(recorded: Mapping[str, Any] | None, here: Mapping[str, Any]) -> list[str]:
    """What differs between a profile's host and this one, e.g. ["cpu: AMD EPYC → Intel Xeon"]."""
    if not recorded:
        return ["the profile names no host"]
    return [f"{k}: {recorded.get(k)} → {here.get(k)}" for k in HOST_KEYS if recorded.get(k) != here.get(k)]
