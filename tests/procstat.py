"""One process as tests and benchmarks sample it from /proc: memory, CPU time, descriptors.

Each function reads the files of ``/proc/PID`` once and returns the figure as the kernel
gives it (proc(5)); none keeps state, starts or stops anything, or imports the daemon.
"""

from __future__ import annotations

import os

CLK_TCK = os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid``, in KiB (absent for a zombie)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (``VmRSS``), in KiB."""
    try:
        return memory_kib(pid)["VmRSS"]
    except KeyError:
        raise RuntimeError(f"no VmRSS in /proc/{pid}/status (a zombie?)") from None


def rss_bytes(pid: int) -> int:
    return rss_kib(pid) * 1024


def rss_mib(pid: int) -> float:
    """Resident memory in MiB, to a tenth (as the benchmarks print it)."""
    return round(rss_kib(pid) / 1024, 1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (``/proc/PID/stat``, clock ticks), in seconds."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of ``pid`` (``schedstat``, ns resolution); 0 once gone."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as handle:
                total += int(handle.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return total


def minor_faults(pid: int) -> int:
    """Minor page faults of the whole process (``/proc/PID/stat`` field 10); 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except FileNotFoundError:
        return 0
    return int(text[text.rindex(")") + 2 :].split()[7])


def fd_count(pid: int) -> int:
    """Open descriptors of ``pid``. Linux 6.2+ gives the count as the size of
    ``/proc/PID/fd`` (one stat instead of listing thousands); older kernels say 0 there."""
    return os.stat(f"/proc/{pid}/fd").st_size or len(os.listdir(f"/proc/{pid}/fd"))
