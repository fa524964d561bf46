/*
 * adopt: the ptrace mechanics of adopting a running VMM (x86-64).
 *
 * One thread of another process at a time: seize it and stop it (adopt_interrupt,
 * adopt_wait_stop), make it run
 * system calls of our choosing (adopt_syscall), put every register back and let it go
 * (adopt_release). Every wait is bounded by a caller-given timeout. What to inject where is
 * decided by the caller (statsd_qmp/adoption.py); this file only knows ptrace.
 *
 * All calls for one tracee must come from the thread that stopped it (a ptrace rule).
 *
 * The declarations between the cdef markers are read by build_adopt.py and handed to cffi;
 * keep them free of preprocessor lines.
 */
#ifndef STATSD_QMP_ADOPT_H
#define STATSD_QMP_ADOPT_H

#include <stdint.h>

/* cdef-begin */
/* Bumped when the C interface changes; the Python wrapper checks it. */
#define ADOPT_ABI_VERSION 2

/* adopt_thread.state */
#define ADOPT_DETACHED 0   /* not traced by us (never seized, or released) */
#define ADOPT_STOPPED 1    /* seized and stopped in the interrupt stop; registers saved */
#define ADOPT_STEPPED 2    /* seized and stopped after an injected syscall */
#define ADOPT_RUNNING 3    /* seized but did not stop in time: the tracer thread's exit detaches it */
#define ADOPT_GONE 4       /* the thread exited while we traced it (reaped) */

/* adopt_thread.failure: what went wrong in the last call (0: nothing) */
#define ADOPT_FAIL_NONE 0
#define ADOPT_FAIL_SEIZE 1        /* PTRACE_SEIZE refused: errno in error */
#define ADOPT_FAIL_TIMEOUT 2      /* no stop within the timeout */
#define ADOPT_FAIL_EXITED 3       /* the thread (or its process) exited */
#define ADOPT_FAIL_GROUP_STOP 4   /* the process is stopped (SIGSTOP); released as it was */
#define ADOPT_FAIL_PTRACE 5       /* another ptrace request failed: errno in error */
#define ADOPT_FAIL_NOT_SYSCALL 6  /* the given address does not hold a syscall instruction */
#define ADOPT_FAIL_SIGNAL 7       /* the injected syscall raised a signal (seccomp SIGSYS) */
#define ADOPT_FAIL_STATE 8        /* the call does not fit the thread's state */
#define ADOPT_FAIL_ARCH 9         /* not x86-64, or the thread runs 32-bit code */

struct adopt_thread {
    int tid;
    int state;
    int failure;
    int error;               /* errno of the failing request, or the unexpected signal */
    int passed_signals;      /* signals that arrived before the stop and were delivered */
    uint64_t interrupted_ns; /* CLOCK_MONOTONIC: PTRACE_INTERRUPT was sent */
    uint64_t stopped_ns;     /* CLOCK_MONOTONIC: the stop was seen */
    uint64_t released_ns;    /* CLOCK_MONOTONIC: the thread was let go */
    /* The registers at the stop, as the thread will get them back. */
    uint64_t orig_rax;
    uint64_t rax;
    uint64_t rip;
    uint64_t rdi;
    uint64_t rsi;
    uint64_t rdx;
    /* Private: the whole register file (struct user_regs_struct) saved at the stop. */
    uint64_t saved_regs[32];
};

/* Seize thread `tid` and interrupt it, without waiting: many threads can be asked to stop
 * before any is waited for (their stops then overlap). 0, or -1 with failure/error set. */
int adopt_interrupt(struct adopt_thread *thread, int tid);

/* Wait (at most timeout_ns) for the interrupted thread's stop and save its registers. 0 when
 * stopped, else -1 with failure/error set (the thread is then detached, or, when it never
 * stopped, left seized: the tracer thread's exit detaches it). */
int adopt_wait_stop(struct adopt_thread *thread, int64_t timeout_ns);

/* Run syscall `nr` with three arguments in the stopped thread, single-stepping the syscall
 * instruction at `syscall_addr` (bytes 0f 05 in the tracee). *result gets the raw return
 * value (-errno on failure). 0 when the syscall ran, else -1 with failure/error set. */
int adopt_syscall(struct adopt_thread *thread, uint64_t syscall_addr, int64_t nr, uint64_t arg0,
                  uint64_t arg1, uint64_t arg2, int64_t timeout_ns, int64_t *result);

/* Put the registers saved at the stop back and detach. 0, or -1 with failure/error set. */
int adopt_release(struct adopt_thread *thread);

/* The seccomp filter `index` (0: the newest) of the stopped thread as classic BPF
 * (PTRACE_SECCOMP_GET_FILTER, needs CAP_SYS_ADMIN): copies up to `count` instructions, 8
 * bytes each in the kernel's struct sock_filter layout (u16 code, u8 jt, u8 jf, u32 k),
 * into `program` and returns how many. -errno on failure (ENOENT: no such filter; E2BIG:
 * more than `count` instructions). */
int adopt_seccomp_filter(struct adopt_thread *thread, int index, uint8_t *program, int count);

int adopt_abi_version(void);
/* cdef-end */

#endif
