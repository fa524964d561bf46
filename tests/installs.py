"""A copy of this package installed in a venv of ``/usr/bin/python3`` (for other users)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import statsd_qmp

SYSTEM_PYTHON = "/usr/bin/python3"


def readable_install(base: Path) -> Path:
    """A venv of ``/usr/bin/python3`` holding a copy of this package, readable by everyone.

    ``statsd-qmp exec`` needs nothing beyond the stdlib and the package (with its compiled
    hold library), so no pip run is needed: the launcher is the one pip would write.
    """
    install = base / "statsd-qmp"
    subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(install)], check=True, timeout=60
    )
    (site,) = install.glob("lib/python3*/site-packages")
    shutil.copytree(
        Path(statsd_qmp.__file__).resolve().parent,
        site / "statsd_qmp",
        ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.o"),
    )
    launcher = install / "bin" / "statsd-qmp"
    launcher.write_text(
        f"#!{install}/bin/python3\n"
        "import sys\n"
        "from statsd_qmp.cli import main\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main())\n"
    )
    launcher.chmod(0o755)
    for path in [install, *install.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IRGRP | stat.S_IROTH)
            if path.is_dir():
                path.chmod(path.stat().st_mode | stat.S_IXGRP | stat.S_IXOTH)
    return install
