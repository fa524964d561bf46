"""cffi build script (out-of-line API mode) for ``statsd_qmp._statsread``.

One extension, two C files: statsread.c (bulk pread) and statsfmt.c (JSON rendering of stats
replies from the data blocks).

Run by setuptools through ``cffi_modules`` in setup.py; also runnable by hand for a quick
in-place build: ``python cffi_build/build_statsread.py``. The C lives in statsread.c/.h; the
cdef is the marked part of the header, so the two cannot drift apart.
"""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = [HERE / "statsread.h", HERE / "statsfmt.h"]


def _cdef_from_header(text: str) -> str:
    begin = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[begin:end]


ffibuilder = FFI()
ffibuilder.cdef("".join(_cdef_from_header(header.read_text()) for header in HEADERS))
ffibuilder.set_source(
    "statsd_qmp._statsread",
    '#include "statsread.h"\n#include "statsfmt.h"',
    # Relative paths: setuptools refuses absolute source paths in an sdist/wheel build.
    sources=["cffi_build/statsread.c", "cffi_build/statsfmt.c"],
    include_dirs=["cffi_build"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    import os

    os.chdir(HERE.parent)
    ffibuilder.compile(verbose=True)
