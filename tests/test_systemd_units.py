"""The systemd units in ``systemd/``: verified, hardened, and in step with each other.

``systemd-analyze`` runs here without systemd as PID 1 (as in CI). Its ``verify`` checks that
``ExecStart=`` names an executable, and ``/opt/statsd-qmp/bin/statsd-qmp`` exists only where
the package is installed as the README describes. Rather than touching ``/opt``, the check
adds a temporary directory to the unit search path holding a drop-in
(``statsd-qmp.service.d/ci.conf``) that resets ``ExecStart=`` to a stub script taking the same
arguments. The shipped files themselves are what systemd parses: a bad directive, section or
value in them still shows. A second test proves that the missing binary is the *only* thing
the drop-in hides, and a third that ``verify`` does report a broken unit.

``systemd-analyze security --offline=yes`` scores the service; systemd's scale puts "OK" at
an exposure of 1.0 to 4.9 ("SAFE" and "PERFECT" below it), so the score must stay under 5.0.

Without ``systemd-analyze`` these tests skip, or fail when ``STATSD_QMP_REQUIRE_KVM=1`` (CI,
where Debian's ``systemd`` package provides it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from statsd_qmp.config import load_config

from .conftest import need, program_problem

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = SYSTEMD_DIR / "statsd-qmp.service"
SOCKET = SYSTEMD_DIR / "statsd-qmp.socket"
METRICS_SOCKET = SYSTEMD_DIR / "statsd-qmp-metrics.socket"
SYSUSERS = SYSTEMD_DIR / "statsd-qmp.sysusers"
README = SYSTEMD_DIR / "README.md"
EXAMPLE_CONFIG = SYSTEMD_DIR / "statsd-qmp.toml"

INSTALLED_BINARY = "/opt/statsd-qmp/bin/statsd-qmp"
CONFIG_PATH = "/etc/statsd-qmp/statsd-qmp.toml"
EXEC_ARGS = f"serve --config {CONFIG_PATH}"
WORST_ACCEPTED = 4.9  # highest exposure systemd still calls "OK"


def tool(name: str) -> str:
    need(program_problem(name))
    path = shutil.which(name)
    assert path is not None
    return path


def run(args: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0", **(env or {})},
    )


def stub_unit_dir(tmp_path: Path) -> Path:
    """A unit directory with a drop-in pointing ExecStart at a stub with the real arguments."""
    unit_dir = tmp_path / "units"
    stub = tmp_path / "bin" / "statsd-qmp"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    dropin = unit_dir / "statsd-qmp.service.d" / "ci.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text(f"[Service]\nExecStart=\nExecStart={stub} {EXEC_ARGS}\n")
    return unit_dir


def verify(units: list[Path], unit_dir: Path | None) -> str:
    """``systemd-analyze verify`` output (stdout + stderr) with the exit status appended."""
    # A trailing ':' keeps the built-in search path (so sockets.target etc. are found).
    env = {"SYSTEMD_UNIT_PATH": f"{unit_dir}:"} if unit_dir is not None else {}
    result = run([tool("systemd-analyze"), "verify", "--man=no", *map(str, units)], env=env)
    output = result.stdout + result.stderr
    print(output)
    return output + ("" if result.returncode == 0 else f"[exit {result.returncode}]\n")


def test_verify_is_clean(tmp_path: Path) -> None:
    assert verify([SERVICE, SOCKET, METRICS_SOCKET], stub_unit_dir(tmp_path)) == ""


def test_verify_without_the_stub_misses_only_the_binary() -> None:
    output = verify([SERVICE, SOCKET, METRICS_SOCKET], None)
    if os.access(INSTALLED_BINARY, os.X_OK):
        assert output == ""  # installed as the README says: the units verify as they are
    else:
        assert output.splitlines() == [
            f"statsd-qmp.service: Command {INSTALLED_BINARY} is not executable: "
            "No such file or directory",
            "[exit 1]",
        ]


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(SOCKET, broken)
    text = SERVICE.read_text().replace("[Service]\n", "[Service]\nNoSuchDirective=yes\n", 1)
    (broken / SERVICE.name).write_text(text)
    output = verify([broken / SERVICE.name, broken / SOCKET.name], stub_unit_dir(tmp_path))
    # A warning, exit status 0: only the "no output at all" rule catches it.
    assert "Unknown key 'NoSuchDirective' in section [Service]" in output


def test_security_exposure_is_ok_or_better() -> None:
    result = run([tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(SERVICE)])
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    found = re.search(
        r"Overall exposure level for statsd-qmp\.service: (\d+\.\d) (\w+)", result.stdout
    )
    assert found, result.stdout
    score, level = float(found.group(1)), found.group(2)
    print(f"systemd-analyze security: exposure {score} {level}")
    assert level in ("OK", "SAFE", "PERFECT")
    assert score <= WORST_ACCEPTED
    # What the README promises about the identity and the code, as systemd itself judges it.
    for passed in ("User=/DynamicUser=", "NoNewPrivileges=", "MemoryDenyWriteExecute="):
        assert re.search(rf"^✓ {re.escape(passed)}", result.stdout, re.MULTILINE), passed


def test_sysusers_creates_the_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run([tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc/passwd").read_text().splitlines()
    group_lines = (tmp_path / "etc/group").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    groups = {line.split(":")[0]: line.split(":") for line in group_lines}
    user, group = users["statsd-qmp"], groups["statsd-qmp"]
    assert user[3] == group[2]  # primary group
    assert int(user[2]) < 1000  # a system user
    assert user[6].endswith("nologin")


# --- the files agree with each other and with the daemon's contract -------------------------


def directives(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (unit files may repeat a key)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def one(found: dict[str, list[str]], key: str) -> str:
    values = found.get(key, [])
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_service_contract() -> None:
    service = directives(SERVICE)
    assert one(service, "Service.ExecStart") == f"{INSTALLED_BINARY} {EXEC_ARGS}"
    assert one(service, "Service.Type") == "notify"
    assert one(service, "Service.NotifyAccess") == "main"
    assert one(service, "Service.Restart") == "on-failure"
    assert one(service, "Service.WatchdogSec") == "30s"
    assert one(service, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "Service.User") == "statsd-qmp"
    caps = {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH", "CAP_CHOWN"}
    assert set(one(service, "Service.CapabilityBoundingSet").split()) == caps
    assert set(one(service, "Service.AmbientCapabilities").split()) == caps
    assert "pidfd_getfd" in service["Service.SystemCallFilter"][0].split()
    assert one(service, "Service.ProtectProc") == "default"
    assert service.get("Service.PrivateUsers", ["no"]) == ["no"]
    assert one(service, "Service.MemoryDenyWriteExecute") == "yes"
    assert int(one(service, "Service.LimitNOFILE")) >= 65536
    assert one(service, "Service.ConfigurationDirectory") == "statsd-qmp"
    assert "statsd-qmp.socket" in one(service, "Unit.Requires").split()


def test_the_socket_lives_where_the_daemon_and_its_runtime_directory_are() -> None:
    service, sock = directives(SERVICE), directives(SOCKET)
    runtime = Path("/run") / one(service, "Service.RuntimeDirectory")
    # Cleanup of the RuntimeDirectory must never take the socket unit's socket with it.
    assert one(service, "Service.RuntimeDirectoryPreserve") == "yes"
    listen = Path(one(sock, "Socket.ListenStream"))
    assert listen == runtime / "qmp.sock"
    assert load_config(EXAMPLE_CONFIG).run_dir == runtime
    assert one(sock, "Socket.FileDescriptorName") == "host"
    # Every user may connect (and sees its own VMs): the daemon decides what each one sees.
    assert one(sock, "Socket.SocketMode") == "0666"
    assert one(sock, "Socket.SocketGroup") == "statsd-qmp"
    assert one(sock, "Socket.Accept") == "no"


def test_readme_explains_every_service_directive() -> None:
    readme = README.read_text()
    keys = {key.split(".", 1)[1] for key in directives(SERVICE) if key.startswith("Service.")}
    keys |= {key.split(".", 1)[1] for key in directives(SOCKET) if key.startswith("Socket.")}
    keys |= {
        key.split(".", 1)[1] for key in directives(METRICS_SOCKET) if key.startswith("Socket.")
    }
    missing = sorted(key for key in keys if f"`{key}=" not in readme)
    assert not missing, f"systemd/README.md does not explain: {missing}"


# --- statsd-qmp-top.service: kvm_stat.service's counterpart -----------------------------------

TOP_SERVICE = SYSTEMD_DIR / "statsd-qmp-top.service"
TOP_LOGROTATE = SYSTEMD_DIR / "statsd-qmp-top.logrotate"


def top_arguments() -> list[str]:
    """The arguments ExecStart= gives ``statsd-qmp`` (after the installed binary)."""
    command = one(directives(TOP_SERVICE), "Service.ExecStart").split()
    assert command[0] == INSTALLED_BINARY
    return command[1:]


def test_top_unit_verifies_and_is_safe(tmp_path: Path) -> None:
    unit_dir = stub_unit_dir(tmp_path)
    dropin = unit_dir / "statsd-qmp-top.service.d" / "ci.conf"
    dropin.parent.mkdir()
    stub = tmp_path / "bin" / "statsd-qmp"
    dropin.write_text(f"[Service]\nExecStart=\nExecStart={stub} {' '.join(top_arguments())}\n")
    assert verify([TOP_SERVICE, SERVICE, SOCKET], unit_dir) == ""
    result = run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(TOP_SERVICE)]
    )
    assert result.returncode == 0, result.stderr
    found = re.search(
        r"Overall exposure level for statsd-qmp-top\.service: (\d+\.\d)", result.stdout
    )
    assert found, result.stdout
    assert float(found.group(1)) <= WORST_ACCEPTED


def test_top_unit_logs_where_logrotate_rotates() -> None:
    from statsd_qmp.cli import build_parser

    service = directives(TOP_SERVICE)
    args = build_parser().parse_args(top_arguments())  # the real command line accepts it
    assert args.command == "top"
    assert (args.csv, args.skip_zero_records, args.set_delay) == (True, True, 10.0)
    log = Path(args.log_to_file)
    assert log.parent == Path("/var/log") / one(service, "Service.LogsDirectory")
    assert one(service, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"  # reopens the file
    assert one(service, "Service.User") == directives(SERVICE)["Service.User"][0]
    assert one(service, "Service.CapabilityBoundingSet") == ""
    rotate = TOP_LOGROTATE.read_text()
    assert rotate.splitlines()[1] == f"{log} {{"
    assert "systemctl reload statsd-qmp-top.service" in rotate


def test_readme_explains_every_top_directive() -> None:
    readme = README.read_text()
    keys = {key.split(".", 1)[1] for key in directives(TOP_SERVICE) if "." in key}
    missing = sorted(key for key in keys if f"`{key}=" not in readme)
    assert not missing, f"systemd/README.md does not explain: {missing}"


def test_the_metrics_socket_is_named_loopback_and_filtered() -> None:
    from statsd_qmp.app import METRICS_FD_NAME
    from statsd_qmp.metricsmap import DEFAULT_METRICS_LISTEN

    sock, service = directives(METRICS_SOCKET), directives(SERVICE)
    assert one(sock, "Socket.ListenStream") == DEFAULT_METRICS_LISTEN
    assert one(sock, "Socket.FileDescriptorName") == METRICS_FD_NAME
    assert one(sock, "Socket.Service") == SERVICE.name
    assert one(sock, "Socket.Accept") == "no"
    # Loopback only, unless a drop-in names more peers (systemd/README.md says how).
    assert one(sock, "Socket.IPAddressDeny") == "any"
    assert one(sock, "Socket.IPAddressAllow") == "localhost"
    # The service creates no IP socket itself: the passed one is all it has.
    assert one(service, "Service.RestrictAddressFamilies") == "AF_UNIX"
    assert one(service, "Service.IPAddressDeny") == "any"
    assert one(service, "Service.PrivateNetwork") == "yes"
    assert METRICS_SOCKET.name in one(service, "Unit.Wants").split()
    assert METRICS_SOCKET.name in one(service, "Install.Also").split()
    # Under the units the daemon binds nothing of its own: the example asks for no address.
    assert load_config(EXAMPLE_CONFIG).metrics_listen == ()
