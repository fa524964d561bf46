"""Can a given user run this installation, as libvirt runs ``statsd-qmp exec`` for its QEMU?

Owns: the files ``statsd-qmp exec`` needs (the command's script, its interpreter and the
interpreter's real file, ``pyvenv.cfg``, the standard library, the package, the hold library,
optionally the ``<emulator>`` wrapper), finding the first part of each path a user may not
use (a directory without search permission, a file without read or execute permission), the
message saying what to fix, and ``statsd-qmp check-install``. Imports the stdlib and
``errors`` only (never trio or the daemon): ``holdlib`` uses it on ``exec``'s error path,
and passes it the hold library's location.

Why: libvirt runs the wrapper, the venv's interpreter and the preload library as its QEMU user
(``libvirt-qemu`` on Debian). A venv built from a Python under ``/root`` (mode 0700, as pyenv
installs) then fails only at ``virsh start``, with ``exec: /opt/statsd-qmp/bin/statsd-qmp:
Permission denied``, while the capability probe, cached from an earlier run, passed. The kernel
refuses the interpreter before any of our code runs, so ``exec`` itself cannot say why; a check
run beforehand, as root for that user, can.

Checking for another user forks a child that drops to that user's uid, gid and groups and asks
the kernel (``access``): ACLs, capabilities and every path component are judged as they will be.
"""

from __future__ import annotations

import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

READ = "r"
READ_EXEC = "rx"

# What to do when the interpreter itself is out of reach: the usual cause is a pyenv or
# self-built Python under a private home directory.
VENV_FIX = (
    "build the installation from a Python every user can reach, for example "
    "'/usr/bin/python3 -m venv /opt/statsd-qmp && /opt/statsd-qmp/bin/pip install .'"
)


def needed_files(library: str, emulator: str | None = None) -> list[tuple[str, str, str]]:
    """``(role, path, access)`` for every file ``statsd-qmp exec`` needs, this installation
    (``library``: the hold library's path)."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    script = os.path.join(sys.prefix, "bin", "statsd-qmp")
    files = []
    if emulator is not None:
        files.append(("<emulator> wrapper", emulator, READ_EXEC))
    if os.path.exists(script):
        files.append(("command", script, READ_EXEC))
    files += [
        ("interpreter", sys.executable, READ_EXEC),
        ("interpreter (real file)", os.path.realpath(sys.executable), READ_EXEC),
        ("standard library", os.__file__ or os.path.join(sys.base_prefix, "lib"), READ),
        ("package", os.path.join(package_dir, "__init__.py"), READ),
        ("hold library", library, READ),
    ]
    venv_config = os.path.join(sys.prefix, "pyvenv.cfg")
    if sys.prefix != sys.base_prefix and os.path.exists(venv_config):
        files.append(("venv configuration", venv_config, READ))
    return files


def _describe(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError as exc:
        return exc.strerror or str(exc)
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"mode {stat.S_IMODE(info.st_mode):04o}, owner {owner}:{group}"


def blocker(path: str, wanted: str) -> str | None:
    """As this process: why ``path`` cannot be used (``wanted``: "r" or "rx"), or None.

    Names the first directory on the way without search permission (for the path as given
    and, for a symlink, for its target), else the file's missing permission.
    """
    for candidate in dict.fromkeys([os.path.abspath(path), os.path.realpath(path)]):
        parent = os.path.dirname(candidate)
        walked = "/"
        for part in parent.strip("/").split("/"):
            if not part:
                continue
            walked = os.path.join(walked, part)
            if not os.access(walked, os.X_OK):
                return f"directory {walked} cannot be entered ({_describe(walked)})"
    if not os.path.exists(path):
        return "does not exist"
    if not os.access(path, os.R_OK):
        return f"cannot be read ({_describe(path)})"
    if "x" in wanted and not os.access(path, os.X_OK):
        return f"cannot be executed ({_describe(path)})"
    return None


def fix_for(role: str, path: str, problem: str) -> str:
    """The advice for one blocked file."""
    if role.startswith("interpreter") or role == "standard library":
        return VENV_FIX
    if problem.startswith("directory "):
        directory = problem.split()[1]
        return f"let that user enter {directory} (chmod o+x {directory}) or install elsewhere"
    if problem == "does not exist":
        return "reinstall ('pip install .' builds the hold library; it needs a C compiler)"
    return f"chmod a+r{'x' if role in ('command', '<emulator> wrapper') else ''} {path}"


def problems(files: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """``(role, path, problem)`` for every file this process may not use."""
    found = []
    for role, path, wanted in files:
        problem = blocker(path, wanted)
        if problem is not None:
            found.append((role, path, problem))
    return found


def _who() -> str:
    import pwd

    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def unreadable_library_message(path: str) -> str:
    """Why this process may not read the hold library, and what to fix (for ``exec``)."""
    problem = blocker(path, READ) or "cannot be read"
    return (
        f"the stats-fd hold library {path} {problem} for {_who()}: the VMM would run without "
        f"held stats fds; {fix_for('hold library', path, problem)}. As root, "
        "'statsd-qmp check-install --user USER' checks everything the user running the VMM needs"
    )


def problems_as_user(user: str, files: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """:func:`problems` judged as ``user`` (its uid, gid and groups), in a forked child."""
    import json
    import pwd

    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, judge, report, leave without cleanup
        code = 0
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os.write(write_end, json.dumps(problems(files)).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        from .errors import StatsdQmpError

        raise StatsdQmpError(f"could not take the identity of user {user!r} to check")
    return [(role, path, problem) for role, path, problem in json.loads(b"".join(chunks))]


def run_exec_as(user: str, script: str) -> str | None:
    """Run ``SCRIPT exec -- true`` as ``user``; its complaint, or None when it worked."""
    import pwd
    import subprocess

    entry = pwd.getpwnam(user)
    done = subprocess.run(
        [script, "exec", "--", "true"],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=os.getgrouplist(entry.pw_name, entry.pw_gid),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=False,
    )
    complaint = done.stderr.strip()
    if done.returncode != 0 or complaint:
        return complaint or f"exit status {done.returncode}"
    return None


def check(user: str | None, library: str, emulator: str | None) -> tuple[list[str], bool]:
    """The report lines of ``statsd-qmp check-install`` and whether everything is usable."""
    files = needed_files(library, emulator)
    if user is None or user == _user_name():
        who = _who()
        found = problems(files)
    else:
        if os.geteuid() != 0:
            from .errors import StatsdQmpError

            raise StatsdQmpError(f"checking for another user ({user!r}) needs root")
        who = user
        found = problems_as_user(user, files)
    blocked = {(role, path): problem for role, path, problem in found}
    lines = []
    for role, path, _ in files:
        problem = blocked.get((role, path))
        if problem is None:
            lines.append(f"ok    {role}: {path}")
        else:
            lines.append(f"FAIL  {role}: {path}: {problem}")
            lines.append(f"      fix: {fix_for(role, path, problem)}")
    script = next((path for role, path, _ in files if role == "command"), None)
    if not found and script is not None and user is not None and os.geteuid() == 0:
        complaint = run_exec_as(user, script)
        if complaint is None:
            lines.append(f"ok    'statsd-qmp exec -- true' as {who}")
        else:
            found.append(("command", script, complaint))
            lines.append(f"FAIL  'statsd-qmp exec -- true' as {who}: {complaint}")
    lines.append(
        f"{who} can run this installation" if not found else f"{who} cannot run this installation"
    )
    return lines, not found


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())
