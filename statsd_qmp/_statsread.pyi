# Type stub for the cffi extension built from cffi_build/statsread.{c,h} and statsfmt.{c,h}.
from typing import Any

class _FFI:
    NULL: Any
    def new(self, cdecl: str, init: Any = ...) -> Any: ...
    def buffer(self, cdata: Any, size: int = ...) -> Any: ...
    def from_buffer(self, cdecl: str, python_buffer: Any, require_writable: bool = ...) -> Any: ...
    def cast(self, cdecl: str, value: Any) -> Any: ...

class _Lib:
    STATSREAD_ABI_VERSION: int
    STATSFMT_LITERAL: int
    STATSFMT_U64: int
    STATSFMT_BOOL: int
    STATSFMT_LIST: int
    STATSFMT_LIST_REVERSED: int
    STATSFMT_BASE: int
    STATSFMT_SCALED: int
    STATSFMT_CUMULATIVE: int
    STATSFMT_TOTAL: int
    STATSFMT_FLAG: int
    STATSFMT_SET_LABELS: int
    STATSFMT_LABELS: int
    STATSFMT_MARK: int
    def statsread_bulk(
        self,
        count: int,
        fds: Any,
        offsets: Any,
        lengths: Any,
        dest_offsets: Any,
        buf: Any,
        buf_len: int,
        results: Any,
    ) -> int: ...
    def statsread_abi_version(self) -> int: ...
    def statsfmt_render(
        self,
        words: Any,
        n_words: int,
        literals: Any,
        literals_len: int,
        ops: Any,
        n_ops: int,
        out: Any,
        out_cap: int,
    ) -> int: ...

ffi: _FFI
lib: _Lib
