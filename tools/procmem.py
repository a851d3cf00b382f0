"""Linux process memory for the benchmarks: /proc/self/status fields and a peak-RSS reset."""
from __future__ import annotations


def status_bytes(field: str) -> int | None:
    """A /proc/self/status field in bytes (VmRSS, VmHWM = peak RSS, ...); None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
