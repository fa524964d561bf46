"""The project's exception tree; each error knows the QMP error class it maps to.

Owns: every exception the package raises on purpose and lets leave a module (the JSON
parser's internal ``qjson.parser.ParseError`` never does: it becomes a ``JsonError`` item).
Imports the stdlib only (no trio, no os, no structlog), so the pure modules can use it.

Tree::

    StatsdQmpError                 base; ``qmp_class`` is "GenericError"
    +-- StatsFileError             a stats fd is not a valid KVM stats file, or reading failed
    |   +-- StatsFormatError       the bytes are there but do not follow the KVM layout
    |   +-- StatsReadError         the read itself failed (errno), or came back short
    +-- NativeUnavailableError     the compiled ``_statsread`` extension is not built
    +-- KvmError                   an ioctl on /dev/kvm, a VM or a vCPU failed (owned VMs)
    +-- AdoptionError              a VMM cannot or must not be adopted, or adopting it failed
    +-- RunDirBusyError            another daemon holds the run directory's lock
    +-- ConfigError                the configuration file cannot be used
    +-- QmpError                   an error that becomes a QMP ``error`` reply
        +-- CommandNotFoundError   ``qmp_class`` is "CommandNotFound"

    QmpClientError                 (client side) the server closed or sent no QMP reply
"""

from __future__ import annotations

from pathlib import Path


class StatsdQmpError(Exception):
    """Base of every error raised on purpose by statsd-qmp."""

    qmp_class = "GenericError"


class StatsFileError(StatsdQmpError):
    """A KVM stats fd could not be used.

    Raised by ``statsfile`` and ``engine`` with the fd number and what was wrong, so a log line
    or a QMP error names the file. ``fd`` is the descriptor the daemon used; ``origin`` says
    where the fd came from (for example ``vm demo vcpu 1``) when the caller knows it.
    """

    def __init__(self, fd: int, problem: str, *, origin: str | None = None) -> None:
        self.fd = fd
        self.problem = problem
        self.origin = origin
        where = f"stats fd {fd}" + (f" ({origin})" if origin else "")
        super().__init__(f"{where}: {problem}")


class StatsFormatError(StatsFileError):
    """The file's bytes break the KVM binary-stats layout (api.rst 4.133).

    Raised by ``statsfile.StatsFile.parse`` for a bad header, descriptor, id string or offset.
    """


class StatsReadError(StatsFileError):
    """Reading a stats fd failed with an errno, or returned fewer bytes than the layout promises.

    Raised by ``_native`` (bulk reads) and ``statsfile`` (one-time parse). ``errno`` is set when
    the kernel returned an error, ``None`` for a short read.
    """

    def __init__(
        self, fd: int, problem: str, *, errno: int | None = None, origin: str | None = None
    ) -> None:
        self.errno = errno
        super().__init__(fd, problem, origin=origin)


class NativeUnavailableError(StatsdQmpError):
    """The compiled reader ``statsd_qmp._statsread`` cannot be imported.

    Raised by ``_native`` at first use, with the command that builds it.
    """


class KvmError(StatsdQmpError):
    """An ioctl on ``/dev/kvm``, a VM fd or a vCPU fd failed.

    Raised by ``sources.owned`` while creating or running the daemon's own VMs; ``errno`` is
    the kernel's error number.
    """

    def __init__(self, what: str, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(what)


class AdoptionError(StatsdQmpError):
    """A running VMM was not adopted (``statsd-qmp adopt``, ``adopt-vm``, ``adopt = "ptrace"``).

    Raised by ``adoption`` when a precondition fails (architecture, CAP_SYS_PTRACE, Yama, an
    existing tracer, a stopped process, a seccomp filter that would not allow the ioctl) or a
    ptrace step fails; the message says which and why. The VMM is left running, every thread
    released.
    """


class RunDirBusyError(StatsdQmpError):
    """Another daemon holds the run directory's lock.

    Raised by ``socketfiles.lock_run_dir``, naming the other daemon's pid.
    """


class ConfigError(StatsdQmpError):
    """The configuration file cannot be used.

    Raised by ``config.load_config`` (unreadable file, TOML syntax, unknown key, wrong type
    or range) and ``config.resolve_group`` (no such group). ``path`` is the file (None when the
    value did not come from one), ``key`` the dotted key (None for whole-file problems such as
    syntax), ``problem`` what is wrong, ``line`` a 1-based line number when known. ``str()``
    is the one line to show: ``FILE[, line N]: KEY: PROBLEM``.
    """

    def __init__(
        self,
        path: Path | None,
        key: str | None,
        problem: str,
        *,
        line: int | None = None,
        key_in_message: bool = True,
    ) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        self.line = line
        where = [str(path)] if path is not None else []
        if line is not None:
            where.append(f"line {line}")
        parts = [", ".join(where)] if where else []
        if key is not None and key_in_message:
            parts.append(key)
        parts.append(problem)
        super().__init__(": ".join(parts))


class QmpError(StatsdQmpError):
    """An error that is answered to a QMP client as ``{"error": {"class", "desc"}}``.

    Raised by ``protocol`` and ``commands``; ``desc`` is the exact text QEMU would send.
    """

    def __init__(self, desc: str) -> None:
        self.desc = desc
        super().__init__(desc)


class CommandNotFoundError(QmpError):
    """QMP class ``CommandNotFound``: unknown command, or any command before negotiation."""

    qmp_class = "CommandNotFound"


class QmpClientError(Exception):
    """The socket cannot be reached, or the server closed the connection or sent something
    that is not a QMP reply; the message names the path and what to check.

    Raised by ``client.QmpClient`` (the CLI's ``query``); not a daemon error, so not a
    :class:`StatsdQmpError`.
    """
