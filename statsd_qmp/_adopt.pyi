# Type stub for the cffi extension built from cffi_build/adopt.{c,h}.
from typing import Any

class _FFI:
    NULL: Any
    def new(self, cdecl: str, init: Any = ...) -> Any: ...
    def buffer(self, cdata: Any, size: int = ...) -> Any: ...

class _Lib:
    ADOPT_ABI_VERSION: int
    ADOPT_DETACHED: int
    ADOPT_STOPPED: int
    ADOPT_STEPPED: int
    ADOPT_RUNNING: int
    ADOPT_GONE: int
    ADOPT_FAIL_NONE: int
    ADOPT_FAIL_SEIZE: int
    ADOPT_FAIL_TIMEOUT: int
    ADOPT_FAIL_EXITED: int
    ADOPT_FAIL_GROUP_STOP: int
    ADOPT_FAIL_PTRACE: int
    ADOPT_FAIL_NOT_SYSCALL: int
    ADOPT_FAIL_SIGNAL: int
    ADOPT_FAIL_STATE: int
    ADOPT_FAIL_ARCH: int
    def adopt_interrupt(self, thread: Any, tid: int) -> int: ...
    def adopt_wait_stop(self, thread: Any, timeout_ns: int) -> int: ...
    def adopt_syscall(
        self,
        thread: Any,
        syscall_addr: int,
        nr: int,
        arg0: int,
        arg1: int,
        arg2: int,
        timeout_ns: int,
        result: Any,
    ) -> int: ...
    def adopt_release(self, thread: Any) -> int: ...
    def adopt_seccomp_filter(self, thread: Any, index: int, program: Any, count: int) -> int: ...
    def adopt_abi_version(self) -> int: ...

ffi: _FFI
lib: _Lib
