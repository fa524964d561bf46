"""cffi build script (out-of-line API mode) for ``statsd_qmp._adopt``: the ptrace mechanics of
VMM adoption (adopt.c). A separate extension from ``_statsread``: it is loaded only by
``statsd_qmp.adoption``, never by a daemon that does not adopt.

Run by setuptools through ``cffi_modules`` in setup.py; also runnable by hand for a quick
in-place build: ``python cffi_build/build_adopt.py``. The cdef is the marked part of adopt.h.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def _cdef_from_header(text: str) -> str:
    begin = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[begin:end]


ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header((HERE / "adopt.h").read_text()))
ffibuilder.set_source(
    "statsd_qmp._adopt",
    '#include "adopt.h"',
    # Relative paths: setuptools refuses absolute source paths in an sdist/wheel build.
    sources=["cffi_build/adopt.c"],
    include_dirs=["cffi_build"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
