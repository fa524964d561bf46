/*
 * libkvmstatshold.so: an LD_PRELOAD library that makes a VMM hold KVM binary-stats fds.
 *
 * KVM answers VM and vCPU ioctls only from the process that created the VM, so statsd-qmp
 * cannot ask for a stats fd on somebody else's VM; it can only borrow (pidfd_getfd) a stats fd
 * the VMM already holds. QEMU 7.2 holds none. Preloaded into the VMM, this library wraps
 * ioctl(): right after a successful KVM_CREATE_VM or KVM_CREATE_VCPU it issues
 * KVM_GET_STATS_FD on the new fd, in the creating process, and keeps the returned stats fd
 * open (close-on-exec) for the life of the process. /proc/PID/fd then shows
 * anon_inode:kvm-vm-stats and anon_inode:kvm-vcpu-stats:N for the daemon to borrow.
 *
 * Nothing else the VMM sees changes: every call returns the real ioctl's value with the real
 * ioctl's errno, the extra calls' failures are ignored, there is no output (unless
 * STATSD_QMP_HOLD_DEBUG=1, then one line on stderr per extra call) and no allocation.
 *
 * Not a Python extension: a plain shared library built by setup.py (HoldLibBuildExt).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* From include/uapi/linux/kvm.h (KVMIO = 0xAE); spelled out so no kernel headers are needed. */
#define HOLD_KVMIO 0xAE
#define HOLD_KVM_CREATE_VM ((unsigned long)_IO(HOLD_KVMIO, 0x01))
#define HOLD_KVM_CREATE_VCPU ((unsigned long)_IO(HOLD_KVMIO, 0x41))
#define HOLD_KVM_GET_STATS_FD ((unsigned long)_IO(HOLD_KVMIO, 0xce))

typedef int (*ioctl_fn)(int, unsigned long, ...);

/* Resolved once; a race between threads resolves the same pointer twice, which is harmless. */
static ioctl_fn real_ioctl_ptr;
/* -1 not read yet, 0 off, 1 on. */
static int debug_flag = -1;

static ioctl_fn real_ioctl(void)
{
    ioctl_fn fn = __atomic_load_n(&real_ioctl_ptr, __ATOMIC_ACQUIRE);
    if (__builtin_expect(fn != NULL, 1))
        return fn;
    int saved = errno; /* dlsym may touch errno */
    fn = (ioctl_fn)dlsym(RTLD_NEXT, "ioctl");
    if (fn != NULL)
        __atomic_store_n(&real_ioctl_ptr, fn, __ATOMIC_RELEASE);
    errno = saved;
    return fn;
}

static int debug_enabled(void)
{
    int flag = __atomic_load_n(&debug_flag, __ATOMIC_RELAXED);
    if (flag < 0) {
        const char *value = getenv("STATSD_QMP_HOLD_DEBUG");
        flag = value != NULL && strcmp(value, "1") == 0;
        __atomic_store_n(&debug_flag, flag, __ATOMIC_RELAXED);
    }
    return flag;
}

/* One line on stderr, built on the stack and written with one write(2): no stdio buffers. */
static void debug_line(const char *what, int source_fd, int stats_fd, int err)
{
    char line[160];
    int n;
    if (stats_fd >= 0)
        n = snprintf(line, sizeof line, "kvmstatshold[%d]: %s fd %d: holding stats fd %d\n",
                     (int)getpid(), what, source_fd, stats_fd);
    else
        n = snprintf(line, sizeof line,
                     "kvmstatshold[%d]: %s fd %d: KVM_GET_STATS_FD failed: errno %d\n",
                     (int)getpid(), what, source_fd, err);
    if (n > 0) {
        size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
        ssize_t ignored = write(STDERR_FILENO, line, len);
        (void)ignored;
    }
}

/* Ask for a stats fd on a VM or vCPU fd this process just created, and keep it. The caller
 * saves and restores errno around this. */
static void hold_stats_fd(ioctl_fn fn, int kvm_fd, const char *what)
{
    int stats_fd = fn(kvm_fd, HOLD_KVM_GET_STATS_FD, 0UL);
    int err = errno;
    if (stats_fd >= 0) {
        /* The kernel creates it O_CLOEXEC; make sure, so an exec'd child never inherits it. */
        int flags = fcntl(stats_fd, F_GETFD);
        if (flags >= 0 && !(flags & FD_CLOEXEC))
            (void)fcntl(stats_fd, F_SETFD, flags | FD_CLOEXEC);
    }
    if (debug_enabled())
        debug_line(what, kvm_fd, stats_fd, err);
    /* The fd is deliberately never closed: it lives as long as the process. */
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    /* Every ioctl third argument is an int or a pointer; on LP64 both fit an unsigned long. */
    unsigned long arg = va_arg(ap, unsigned long);
    va_end(ap);

    ioctl_fn fn = real_ioctl();
    if (__builtin_expect(fn == NULL, 0)) {
        errno = ENOSYS;
        return -1;
    }
    int ret = fn(fd, request, arg);
    if (__builtin_expect(request != HOLD_KVM_CREATE_VM && request != HOLD_KVM_CREATE_VCPU, 1))
        return ret;
    if (ret < 0)
        return ret; /* failed: nothing to hold, errno is the real one */

    int saved = errno;
    hold_stats_fd(fn, ret, request == HOLD_KVM_CREATE_VM ? "KVM_CREATE_VM" : "KVM_CREATE_VCPU");
    errno = saved;
    return ret;
}

/* A constant for smoke tests (ctypes) to check that the right library is loaded. */
EXPORT int statsd_qmp_hold_version(void)
{
    return 1;
}
