/* ptrace mechanics of VMM adoption; see adopt.h for the contract.
 *
 * How a thread is stopped and given back (x86-64, Linux >= 3.4 for PTRACE_SEIZE):
 *
 * - PTRACE_SEIZE + PTRACE_INTERRUPT: the thread stops in an event stop (PTRACE_EVENT_STOP,
 *   SIGTRAP) from inside get_signal(), before the kernel's syscall-restart handling. A thread
 *   that was blocked in a restartable syscall is stopped with rax = -ERESTART* and orig_rax =
 *   the syscall number; giving those exact registers back makes the kernel restart it after
 *   we let go, just as after a signal without a handler (arch_do_signal_or_restart). A
 *   completed syscall's result is in rax and is given back unchanged.
 * - A signal that reaches the thread first (a signal-delivery stop) is delivered as it came
 *   (PTRACE_CONT with that signal); the interrupt stays pending and comes next.
 * - An injected syscall runs from an existing `syscall` instruction with orig_rax = -1 (so
 *   the kernel's restart handling leaves our registers alone) under PTRACE_SINGLESTEP; the
 *   single-step trap after the instruction (a SIGTRAP signal-delivery stop) carries its
 *   result in rax. That SIGTRAP is ours and is discarded when we resume.
 * - Memory (errno, the stack) is never written: only registers change, and all of them are
 *   put back with PTRACE_SETREGS before PTRACE_DETACH.
 *
 * Waits poll waitpid(WNOHANG) against a deadline (a stop usually arrives within tens of
 * microseconds): no unbounded wait, no SIGCHLD handling in the caller's process.
 */
#include "adopt.h"

#include <errno.h>
#include <string.h>
#include <time.h>

int adopt_abi_version(void)
{
    return ADOPT_ABI_VERSION;
}

#if defined(__x86_64__)

#include <linux/filter.h>
#include <sched.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>

#ifndef PTRACE_SEIZE
#define PTRACE_SEIZE 0x4206
#endif
#ifndef PTRACE_INTERRUPT
#define PTRACE_INTERRUPT 0x4207
#endif
#ifndef PTRACE_EVENT_STOP
#define PTRACE_EVENT_STOP 128
#endif
#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif

#define USER_CS_64 0x33      /* __USER_CS: the thread runs 64-bit code */
#define SPIN_NS 200000       /* yield-poll this long before sleeping between polls */
#define POLL_SLEEP_NS 50000
#define MAX_SIGNAL_ROUNDS 16 /* signals passed on while waiting for one stop */
#define MAX_INJECT_TRIES 4   /* injections redone after a signal came first */

_Static_assert(sizeof(struct user_regs_struct) <= sizeof(((struct adopt_thread *)0)->saved_regs),
               "saved_regs too small for struct user_regs_struct");

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct user_regs_struct *saved(struct adopt_thread *t)
{
    return (struct user_regs_struct *)(void *)t->saved_regs;
}

static int fail(struct adopt_thread *t, int failure, int error)
{
    t->failure = failure;
    t->error = error;
    return -1;
}

enum wait_outcome { WAIT_STOPPED, WAIT_TIMEOUT, WAIT_GONE };

/* Wait for the next stop of t->tid until `deadline` (CLOCK_MONOTONIC ns). */
static enum wait_outcome wait_stop(struct adopt_thread *t, uint64_t deadline, int *status)
{
    uint64_t start = now_ns();

    for (;;) {
        pid_t got = waitpid(t->tid, status, __WALL | WNOHANG);

        if (got == t->tid) {
            if (WIFSTOPPED(*status))
                return WAIT_STOPPED;
            if (WIFEXITED(*status) || WIFSIGNALED(*status)) {
                t->state = ADOPT_GONE;
                return WAIT_GONE;
            }
            continue;
        }
        if (got < 0 && errno != EINTR) {
            /* ECHILD: no longer our tracee (it exited and was reaped by its process). */
            t->state = ADOPT_GONE;
            return WAIT_GONE;
        }
        uint64_t now = now_ns();
        if (now >= deadline)
            return WAIT_TIMEOUT;
        if (now - start < SPIN_NS) {
            sched_yield();
        } else {
            struct timespec pause = {0, POLL_SLEEP_NS};
            nanosleep(&pause, NULL);
        }
    }
}

static int get_regs(struct adopt_thread *t, struct user_regs_struct *regs)
{
    if (ptrace(PTRACE_GETREGS, t->tid, 0, regs) < 0)
        return fail(t, ADOPT_FAIL_PTRACE, errno);
    return 0;
}

static void detach_quietly(struct adopt_thread *t)
{
    if (ptrace(PTRACE_DETACH, t->tid, 0, 0) == 0)
        t->state = ADOPT_DETACHED;
}

/*
 * Wait for the interrupt stop, passing on any signal that stops the thread first (SIGTRAP
 * is dropped when `drop_sigtrap`: it is then the trap of our own single step). On success
 * the registers are saved and the thread is ADOPT_STOPPED.
 */
static int reach_interrupt_stop(struct adopt_thread *t, uint64_t deadline, int drop_sigtrap)
{
    int reached = 0;

    for (int round = 0; round < MAX_SIGNAL_ROUNDS && !reached; round++) {
        int status = 0;
        enum wait_outcome outcome = wait_stop(t, deadline, &status);

        if (outcome == WAIT_GONE)
            return fail(t, ADOPT_FAIL_EXITED, 0);
        if (outcome == WAIT_TIMEOUT) {
            t->state = ADOPT_RUNNING;
            return fail(t, ADOPT_FAIL_TIMEOUT, 0);
        }
        int event = (status >> 16) & 0xff;
        int sig = WSTOPSIG(status);

        if (event == PTRACE_EVENT_STOP) {
            if (sig == SIGTRAP) {
                reached = 1; /* our PTRACE_INTERRUPT */
                break;
            }
            /* A group stop (SIGSTOP, SIGTSTP, ...): the whole VMM is stopped. Detaching
             * leaves it stopped, as it was. */
            detach_quietly(t);
            return fail(t, ADOPT_FAIL_GROUP_STOP, sig);
        }
        int pass = (sig == SIGTRAP && drop_sigtrap) ? 0 : sig;

        if (event == 0 && pass)
            t->passed_signals++;
        /* Still seized, the interrupt is still pending: it comes after this signal. */
        if (ptrace(PTRACE_CONT, t->tid, 0, (void *)(long)(event == 0 ? pass : 0)) < 0)
            return fail(t, errno == ESRCH ? ADOPT_FAIL_EXITED : ADOPT_FAIL_PTRACE, errno);
    }
    if (!reached) {
        /* A storm of signals: still seized and running; the tracer thread's exit
         * detaches it. */
        t->state = ADOPT_RUNNING;
        return fail(t, ADOPT_FAIL_TIMEOUT, 0);
    }
    struct user_regs_struct *regs = saved(t);

    if (get_regs(t, regs) < 0)
        return -1;
    t->state = ADOPT_STOPPED;
    t->stopped_ns = now_ns();
    t->orig_rax = regs->orig_rax;
    t->rax = regs->rax;
    t->rip = regs->rip;
    t->rdi = regs->rdi;
    t->rsi = regs->rsi;
    t->rdx = regs->rdx;
    if (regs->cs != USER_CS_64) {
        detach_quietly(t);
        return fail(t, ADOPT_FAIL_ARCH, (int)regs->cs);
    }
    return 0;
}

int adopt_wait_stop(struct adopt_thread *t, int64_t timeout_ns)
{
    uint64_t deadline = now_ns() + (uint64_t)(timeout_ns > 0 ? timeout_ns : 0);

    if (t->state != ADOPT_RUNNING || t->stopped_ns != 0)
        return fail(t, ADOPT_FAIL_STATE, t->state);
    return reach_interrupt_stop(t, deadline, 0);
}

int adopt_interrupt(struct adopt_thread *t, int tid)
{
    memset(t, 0, sizeof(*t));
    t->tid = tid;
    if (ptrace(PTRACE_SEIZE, tid, 0, 0) < 0)
        return fail(t, ADOPT_FAIL_SEIZE, errno);
    t->state = ADOPT_RUNNING;
    t->interrupted_ns = now_ns();
    if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0) {
        int error = errno;

        /* A seized thread that is not stopped cannot be detached: the tracer thread's
         * exit does it (exit_ptrace). */
        return fail(t, error == ESRCH ? ADOPT_FAIL_EXITED : ADOPT_FAIL_PTRACE, error);
    }
    return 0;
}

/* Give the saved registers back and go on until the next interrupt stop, delivering
 * whatever signal `sig` stopped the thread (0: none) and dropping our own step trap. */
static int settle(struct adopt_thread *t, int sig, uint64_t deadline)
{
    if (ptrace(PTRACE_SETREGS, t->tid, 0, saved(t)) < 0)
        return fail(t, ADOPT_FAIL_PTRACE, errno);
    if (ptrace(PTRACE_CONT, t->tid, 0, (void *)(long)sig) < 0 ||
        ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0)
        return fail(t, errno == ESRCH ? ADOPT_FAIL_EXITED : ADOPT_FAIL_PTRACE, errno);
    t->state = ADOPT_RUNNING;
    return reach_interrupt_stop(t, deadline, 1);
}

int adopt_syscall(struct adopt_thread *t, uint64_t syscall_addr, int64_t nr, uint64_t arg0,
                  uint64_t arg1, uint64_t arg2, int64_t timeout_ns, int64_t *result)
{
    uint64_t deadline = now_ns() + (uint64_t)(timeout_ns > 0 ? timeout_ns : 0);

    t->failure = ADOPT_FAIL_NONE;
    t->error = 0;
    if (t->state != ADOPT_STOPPED && t->state != ADOPT_STEPPED)
        return fail(t, ADOPT_FAIL_STATE, t->state);
    errno = 0;
    long word = ptrace(PTRACE_PEEKTEXT, t->tid, (void *)syscall_addr, 0);
    if (errno != 0)
        return fail(t, ADOPT_FAIL_PTRACE, errno);
    if ((word & 0xffff) != 0x050f)
        return fail(t, ADOPT_FAIL_NOT_SYSCALL, 0);

    for (int attempt = 0; attempt < MAX_INJECT_TRIES; attempt++) {
        struct user_regs_struct regs = *saved(t);

        regs.rip = syscall_addr;
        regs.rax = (uint64_t)nr;
        regs.orig_rax = (uint64_t)-1; /* not in a syscall: no restart handling of ours */
        regs.rdi = arg0;
        regs.rsi = arg1;
        regs.rdx = arg2;
        regs.r10 = 0;
        regs.r8 = 0;
        regs.r9 = 0;
        if (ptrace(PTRACE_SETREGS, t->tid, 0, &regs) < 0)
            return fail(t, ADOPT_FAIL_PTRACE, errno);
        if (ptrace(PTRACE_SINGLESTEP, t->tid, 0, 0) < 0)
            return fail(t, errno == ESRCH ? ADOPT_FAIL_EXITED : ADOPT_FAIL_PTRACE, errno);
        t->state = ADOPT_RUNNING;

        int status = 0;
        enum wait_outcome outcome = wait_stop(t, deadline, &status);

        if (outcome == WAIT_GONE)
            return fail(t, ADOPT_FAIL_EXITED, 0);
        if (outcome == WAIT_TIMEOUT)
            return fail(t, ADOPT_FAIL_TIMEOUT, 0); /* still inside our syscall */
        int event = (status >> 16) & 0xff;
        int sig = WSTOPSIG(status);

        if (event == 0 && sig == SIGTRAP) {
            if (get_regs(t, &regs) < 0)
                return -1;
            if (regs.rip == syscall_addr + 2) {
                *result = (int64_t)regs.rax;
                t->state = ADOPT_STEPPED;
                return 0;
            }
            /* Not past our instruction: a SIGTRAP of the VMM's own came first. */
        }
        if (event == 0 && sig == SIGSYS) {
            /* The VMM's seccomp filter trapped our syscall (SECCOMP_RET_TRAP): drop the
             * SIGSYS, which is ours, and its step trap; the thread is back as it was. */
            if (settle(t, 0, deadline) < 0)
                return -1;
            return fail(t, ADOPT_FAIL_SIGNAL, SIGSYS);
        }
        if (event == PTRACE_EVENT_STOP && sig != SIGTRAP) {
            if (ptrace(PTRACE_SETREGS, t->tid, 0, saved(t)) == 0)
                detach_quietly(t);
            return fail(t, ADOPT_FAIL_GROUP_STOP, sig);
        }
        /* A signal that was pending came before our syscall ran: deliver it with the
         * thread's own registers (its handler frame then holds them), stop again and
         * retry from there. */
        if (settle(t, event == 0 ? sig : 0, deadline) < 0)
            return -1;
    }
    return fail(t, ADOPT_FAIL_TIMEOUT, 0);
}

int adopt_release(struct adopt_thread *t)
{
    if (t->state == ADOPT_DETACHED || t->state == ADOPT_GONE)
        return 0;
    if (t->state == ADOPT_RUNNING)
        return fail(t, ADOPT_FAIL_STATE, t->state);
    if (ptrace(PTRACE_SETREGS, t->tid, 0, saved(t)) < 0 ||
        ptrace(PTRACE_DETACH, t->tid, 0, 0) < 0) {
        int error = errno;

        if (error == ESRCH) {
            int status;

            /* Killed while stopped: collect its exit so nothing stays attached. */
            if (waitpid(t->tid, &status, __WALL | WNOHANG) == t->tid)
                t->state = ADOPT_GONE;
            return fail(t, ADOPT_FAIL_EXITED, error);
        }
        return fail(t, ADOPT_FAIL_PTRACE, error);
    }
    t->state = ADOPT_DETACHED;
    t->released_ns = now_ns();
    return 0;
}

_Static_assert(sizeof(struct sock_filter) == 8, "struct sock_filter is 8 bytes");

int adopt_seccomp_filter(struct adopt_thread *t, int index, uint8_t *program, int count)
{
    if (t->state != ADOPT_STOPPED && t->state != ADOPT_STEPPED)
        return -ESRCH;
    long n = ptrace(PTRACE_SECCOMP_GET_FILTER, t->tid, (void *)(long)index, NULL);

    if (n < 0)
        return -errno;
    if (n > count)
        return -E2BIG;
    n = ptrace(PTRACE_SECCOMP_GET_FILTER, t->tid, (void *)(long)index, program);
    return n < 0 ? -errno : (int)n;
}

#else /* not x86-64: every call refuses, so the package still builds everywhere */

int adopt_interrupt(struct adopt_thread *t, int tid)
{
    memset(t, 0, sizeof(*t));
    t->tid = tid;
    t->failure = ADOPT_FAIL_ARCH;
    return -1;
}

int adopt_wait_stop(struct adopt_thread *t, int64_t timeout_ns)
{
    (void)timeout_ns;
    t->failure = ADOPT_FAIL_ARCH;
    return -1;
}


int adopt_syscall(struct adopt_thread *t, uint64_t syscall_addr, int64_t nr, uint64_t arg0,
                  uint64_t arg1, uint64_t arg2, int64_t timeout_ns, int64_t *result)
{
    (void)syscall_addr, (void)nr, (void)arg0, (void)arg1, (void)arg2, (void)timeout_ns;
    *result = -ENOSYS;
    t->failure = ADOPT_FAIL_ARCH;
    return -1;
}

int adopt_release(struct adopt_thread *t)
{
    return t->state == ADOPT_DETACHED ? 0 : -1;
}

int adopt_seccomp_filter(struct adopt_thread *t, int index, uint8_t *program, int count)
{
    (void)t, (void)index, (void)program, (void)count;
    return -ENOSYS;
}

#endif
