"""The systemd side of the daemon: sd_notify, the watchdog interval, socket activation.

Owns: the three small protocols a ``Type=notify`` service with socket activation speaks to
systemd, written against the documented interfaces (``sd_notify(3)``, ``sd_watchdog_enabled(3)``,
``sd_listen_fds(3)``) instead of libsystemd, in the manner of nobodd's and gunicorn's helpers.
Imports the stdlib only (no trio, no structlog, nothing else from the package), so it works
before logging is configured and in any thread.

Rule: nothing here raises into the daemon. A missing or broken ``$NOTIFY_SOCKET``, a malformed
``$LISTEN_FDS`` or ``$WATCHDOG_USEC``, a closed descriptor: each yields ``False``, ``None`` or
``[]`` and the daemon carries on, as it must when it runs outside systemd.

- :func:`notify` sends ``NAME=value`` assignments in one datagram to ``$NOTIFY_SOCKET`` (a path,
  or ``@name`` for an abstract socket). A newline inside one assignment is replaced by a space,
  so a status text can never smuggle in a second assignment (say ``READY=1``).
- :func:`watchdog_interval` is ``WatchdogSec=`` in seconds when the watchdog is meant for this
  process (``$WATCHDOG_PID`` absent or equal to our PID), else ``None``. Pinging at half of it
  is the caller's choice, as ``sd_watchdog_enabled(3)`` recommends.
- :func:`listen_fds` returns the sockets systemd handed over as ``(fd, name)`` pairs, fds
  counted from 3, names from ``$LISTEN_FDNAMES`` (``FileDescriptorName=``) or ``"unknown"``.
  Like ``sd_listen_fds(3)`` it honours ``$LISTEN_PID``, sets ``FD_CLOEXEC`` on each fd and
  unsets the three variables (by default) so a child never takes the fds for its own. The
  daemon owns these fds from then on; the socket *file* belongs to the socket unit and is never
  the daemon's to unlink.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

__all__ = [
    "SD_LISTEN_FDS_START",
    "listen_fds",
    "monotonic_usec",
    "notify",
    "watchdog_interval",
]

SD_LISTEN_FDS_START = 3
"""The first inherited descriptor (``SD_LISTEN_FDS_START`` in ``sd-daemon.h``)."""

SEND_TIMEOUT = 1.0
"""Seconds :func:`notify` may block when systemd's queue is full, before giving up."""

# A sanity bound on $LISTEN_FDS, far above any real unit yet far below INT_MAX.
_MAX_LISTEN_FDS = 1 << 16


def notify(*assignments: str) -> bool:
    """Send ``assignments`` (``"READY=1"``, ``"STATUS=3 VMs"``...) to systemd in one datagram.

    True when the datagram was sent; False when not running under a notify-aware manager
    (``$NOTIFY_SOCKET`` unset or not a unix socket address), when there is nothing to send, or
    when sending failed for any reason. Never raises.
    """
    try:
        address = _notify_address(os.environ.get("NOTIFY_SOCKET", ""))
        if address is None or not assignments:
            return False
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sent = sock.sendto(message, address)
        return sent == len(message)
    except (OSError, ValueError, UnicodeError, TypeError, AttributeError):
        # OSError: no such socket, refused, timed out; ValueError: embedded NUL; UnicodeError:
        # unencodable text; TypeError/AttributeError: a caller passed a non-string.
        return False


def _notify_address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as an ``AF_UNIX`` address for ``sendto``, or None if unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    return None  # unset, empty, or a transport we do not speak (such as vsock:)


def monotonic_usec() -> str:
    """``MONOTONIC_USEC=...`` for the current ``CLOCK_MONOTONIC`` time, in microseconds.

    ``sd_notify(3)`` asks for it next to ``RELOADING=1`` (systemd 253 and later use it to match
    the reload to its request; older managers ignore it).
    """
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """The service watchdog timeout (``WatchdogSec=``) in seconds, or None when there is none.

    None when ``$WATCHDOG_USEC`` is unset, not a positive integer, or when ``$WATCHDOG_PID`` is
    set and names another process (the watchdog belongs to the service's main process, not to
    its children). Reads the environment on every call and changes nothing.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text:
        pid = _parse_positive_int(pid_text)
        if pid is None or pid != os.getpid():
            return None
    usec = _parse_positive_int(usec_text)
    if usec is None:
        return None
    return usec / 1_000_000


def listen_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """Descriptors passed by socket activation, as ``(fd, name)`` in the order systemd gave.

    Empty unless ``$LISTEN_PID`` is our PID and ``$LISTEN_FDS`` a positive count. The fds
    start at :data:`SD_LISTEN_FDS_START`; a name is the unit's ``FileDescriptorName=`` (the
    ``$LISTEN_FDNAMES`` entry), or ``"unknown"`` when systemd sent none (or fewer names than
    fds). Each returned fd gets ``FD_CLOEXEC``; a number that is not an open descriptor is left
    out. With ``unset_environment`` (the default) ``LISTEN_PID``, ``LISTEN_FDS`` and
    ``LISTEN_FDNAMES`` are removed from the environment whatever the outcome, so a second
    call returns ``[]``. Never raises.

    A listening unix socket is then ``socket.socket(fileno=fd)`` (family and type are read from
    the descriptor).
    """
    pid_text = os.environ.get("LISTEN_PID")
    count_text = os.environ.get("LISTEN_FDS")
    names_text = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(variable, None)
    if not pid_text or not count_text:
        return []
    pid = _parse_positive_int(pid_text)
    count = _parse_positive_int(count_text)
    if pid != os.getpid() or count is None or count > _MAX_LISTEN_FDS:
        return []
    names = names_text.split(":") if names_text else []
    result: list[tuple[int, str]] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            if not flags & fcntl.FD_CLOEXEC:
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            continue  # not an open descriptor: nothing of ours to hand out
        name = names[index] if index < len(names) and names[index] else "unknown"
        result.append((fd, name))
    return result


def _parse_positive_int(text: str) -> int | None:
    """``text`` as a positive decimal integer (digits only, as systemd writes them), or None."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value > 0 else None
