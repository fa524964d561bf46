"""The stats-fd hold library: where it is, the environment that preloads it, exec'ing a VMM.

Owns: the location of ``statsd_qmp/libkvmstatshold.so`` (built from
``cffi_build/kvmstatshold.c`` by setup.py in the same ``pip install``), the ``LD_PRELOAD``
value that loads it, and ``exec_vmm``, which replaces the current process by a VMM with that
environment (``statsd-qmp exec``). Must not import trio, the server or the registry: it runs
in a short-lived process that is about to become the VMM.

Why: KVM answers VM and vCPU ioctls only from the process that created the VM, so the daemon
cannot ask for stats fds itself; it can only borrow the ones a VMM holds, and QEMU 7.2 holds
none. Preloaded, the library wraps ``ioctl`` and, after every successful ``KVM_CREATE_VM`` and
``KVM_CREATE_VCPU``, opens a stats fd on the new VM or vCPU inside the VMM and keeps it for
the process's life (close-on-exec), changing no return value or errno the VMM sees.

``exec_vmm`` execs in place (same PID), so it can be libvirt's ``<emulator>`` wrapper: libvirt
watches the PID it started, and the VMM's fds are then found under that PID. It runs before
every VMM start, so this module imports only ``os``, ``sys`` and ``errors`` at run time (no
``pathlib``, no ``typing``): ``statsd-qmp exec`` costs about a bare interpreter start.
"""

from __future__ import annotations

import os
import sys

from .errors import StatsdQmpError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from typing import NoReturn

LIBRARY_NAME = "libkvmstatshold.so"

_BUILD_HINT = (
    "install the project with 'pip install .' (or 'pip install -e .' in a checkout), which "
    "compiles cffi_build/kvmstatshold.c (needs a C compiler)"
)


def library_location() -> str:
    """Where the hold library belongs (next to this module), whether or not it is there."""
    return os.path.join(os.path.dirname(os.path.realpath(__file__)), LIBRARY_NAME)


def library_file() -> str:
    """The absolute path of the installed hold library, checked to be readable by this user.

    Raises :class:`StatsdQmpError` with the build command when it is not there, and with what
    to fix when this user may not read it: ld.so would then skip it with a warning on stderr
    and the VMM would run without held stats fds, invisible to the daemon.
    """
    path = library_location()
    try:
        is_file = os.path.isfile(path) and os.access(path, os.R_OK)
    except OSError:
        is_file = False
    if is_file:
        return path
    if not os.path.lexists(path):
        raise StatsdQmpError(f"the stats-fd hold library {path} is missing; {_BUILD_HINT}")
    from .install_check import unreadable_library_message

    raise StatsdQmpError(unreadable_library_message(path))


def library_path() -> Path:
    """:func:`library_file` as a :class:`pathlib.Path`."""
    from pathlib import Path

    return Path(library_file())


def preload_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` whose ``LD_PRELOAD`` loads the hold library first.

    An existing ``LD_PRELOAD`` is kept after it, colon-separated; the library is not added a
    second time when it is already first (other copies of it further down are dropped, the
    loader would ignore them anyway).
    """
    lib = library_file()
    # ld.so splits LD_PRELOAD on colons and spaces: a path holding either cannot be preloaded.
    if ":" in lib or " " in lib:
        raise StatsdQmpError(
            f"the hold library path {lib!r} contains ':' or ' ', which LD_PRELOAD cannot express"
        )
    env = dict(environ)
    existing = env.get("LD_PRELOAD", "")
    entries = existing.replace(" ", ":").split(":")
    if entries and entries[0] == lib:
        return env
    rest = [entry for entry in entries if entry and entry != lib]
    env["LD_PRELOAD"] = ":".join([lib, *rest])
    return env


def exec_vmm(argv: Sequence[str]) -> NoReturn:
    """Replace this process by ``argv`` (looked up in ``PATH``) with the hold library preloaded.

    The PID stays the same. Returns only by raising :class:`StatsdQmpError`: empty ``argv``,
    the library missing, or the command not found or not executable.
    """
    args = list(argv)
    if not args:
        raise StatsdQmpError("exec: no command given to run with the stats-fd hold library")
    env = preload_env(os.environ)
    # os.exec* does not flush Python's buffers; anything already printed would be lost.
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib would cost an import on every VMM start
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing to save
            pass
    try:
        os.execvpe(args[0], args, env)
    except FileNotFoundError as exc:
        raise StatsdQmpError(f"exec: command not found: {args[0]!r}") from exc
    except OSError as exc:
        raise StatsdQmpError(f"exec: cannot run {args[0]!r}: {exc.strerror or exc}") from exc
