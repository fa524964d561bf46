"""What the kernel says about unix sockets, for tests that wait for a listener."""

from __future__ import annotations


def listening_sockets() -> set[str]:
    """Paths of the unix sockets in listening state (Flags has __SO_ACCEPTCON)."""
    out: set[str] = set()
    with open("/proc/net/unix") as table:
        next(table)
        for row in table:
            fields = row.split()
            if len(fields) >= 8 and int(fields[3], 16) & 0x10000:
                out.add(fields[7])
    return out
