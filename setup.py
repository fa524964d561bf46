"""Build steps setuptools cannot express in pyproject.toml.

- the cffi extensions ``statsd_qmp._statsread`` and ``statsd_qmp._adopt`` (``cffi_modules``);
- ``statsd_qmp/libkvmstatshold.so``, the LD_PRELOAD library that makes a VMM hold its KVM
  stats fds (see ``cffi_build/kvmstatshold.c`` and ``statsd_qmp.holdlib``). It is a plain
  shared library, not a Python extension: no Python headers, no libpython. ``HoldLibBuildExt``
  compiles it with setuptools' own C compiler object after the extensions, into ``build_lib``
  (so wheels carry it) and, for in-place and editable builds, next to the sources as well.

cffi wraps whatever ``build_ext`` is in ``cmdclass`` when it processes ``cffi_modules``, so
both steps run in the same ``build_ext``.
"""

from __future__ import annotations

import copy
import os
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOLD_PACKAGE = "statsd_qmp"
HOLD_SOURCE = os.path.join("cffi_build", "kvmstatshold.c")
HOLD_LIBRARY = "libkvmstatshold.so"
HOLD_CFLAGS = ["-std=gnu11", "-fPIC", "-O2", "-Wall", "-Wextra", "-fvisibility=hidden"]


class HoldLibBuildExt(build_ext):
    """build_ext that also links cffi_build/kvmstatshold.c into statsd_qmp/libkvmstatshold.so."""

    def run(self) -> None:
        super().run()
        self._build_hold_library()

    def _hold_build_path(self) -> str:
        return os.path.join(self.build_lib, *HOLD_PACKAGE.split("."), HOLD_LIBRARY)

    def _hold_inplace_path(self) -> str:
        build_py = self.get_finalized_command("build_py")
        return os.path.join(build_py.get_package_dir(HOLD_PACKAGE), HOLD_LIBRARY)

    def _hold_compiler(self) -> Any:
        # build_ext.run() sets self.compiler to its configured compiler object whenever there
        # is an extension to build, and the cffi one is always there.
        if not hasattr(self.compiler, "link_shared_object"):
            raise RuntimeError("build_ext configured no C compiler (no extension to build?)")
        return self.compiler

    def _build_hold_library(self) -> None:
        compiler = self._hold_compiler()
        objects = compiler.compile(
            [HOLD_SOURCE], output_dir=self.build_temp, extra_postargs=HOLD_CFLAGS
        )
        target = self._hold_build_path()
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # LDSHARED of a Python built with --enable-shared carries -Wl,-rpath,<python libdir>:
        # useless (and a stray search path) in a library preloaded into a VMM. Link with a copy
        # of the compiler object without it; the shared one stays as build_ext configured it.
        linker = copy.copy(compiler)
        linker.linker_so = [a for a in compiler.linker_so if not a.startswith("-Wl,-rpath")]
        linker.link_shared_object(
            objects,
            target,
            libraries=["dl"],
            extra_postargs=["-Wl,-z,defs"],
        )
        if self.inplace:
            self.copy_file(target, self._hold_inplace_path(), level=self.verbose)

    def get_outputs(self) -> list[str]:
        outputs = list(super().get_outputs())
        outputs.append(self._hold_inplace_path() if self.inplace else self._hold_build_path())
        return outputs

    def get_output_mapping(self) -> dict[str, str]:
        mapping = dict(super().get_output_mapping())
        mapping[self._hold_inplace_path()] = self._hold_build_path()
        return mapping


setup(
    cmdclass={"build_ext": HoldLibBuildExt},
    cffi_modules=[
        "cffi_build/build_statsread.py:ffibuilder",
        "cffi_build/build_adopt.py:ffibuilder",
    ],
)
