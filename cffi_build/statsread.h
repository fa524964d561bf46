/*
 * statsread: bulk pread of many KVM binary-stats fds into one caller-owned buffer.
 *
 * The declarations between the cdef markers are read by build_statsread.py and handed to
 * cffi; keep them free of preprocessor lines.
 */
#ifndef STATSD_QMP_STATSREAD_H
#define STATSD_QMP_STATSREAD_H

#include <stdint.h>

/* cdef-begin */
/* Bumped when the C interface changes; the Python wrapper checks it. */
#define STATSREAD_ABI_VERSION 4

/*
 * Read `count` regions, region i being `lengths[i]` bytes at file offset `offsets[i]` of
 * `fds[i]`, into `buf + dest_offsets[i]`.  Only pread(2) is used: a stats fd borrowed from a
 * VMM shares its file position with the VMM, which read(2) would move.
 *
 * results[i] receives the bytes read (short only at end of file) or -errno.  A region that
 * does not fit inside `buf_len` gets -EINVAL and nothing is written.  The function never
 * allocates and never fails as a whole; it returns the number of regions read completely.
 */
int statsread_bulk(int count, const int *fds, const uint64_t *offsets,
                   const uint32_t *lengths, const uint64_t *dest_offsets,
                   uint8_t *buf, uint64_t buf_len, int64_t *results);

int statsread_abi_version(void);

/*
 * For each of `count` pids, the size `stat("/proc/PID/fd")` reports (its number of open fds
 * since Linux 6.2, 0 before) into counts[i], or -errno (ENOENT: gone; EACCES: not ours to
 * look at).  One call for a whole slice of a /proc scan: the same stat from Python costs
 * ~4 us a process, most of it the interpreter's.  Never allocates; returns `count`.
 */
int statsread_fd_counts(int count, const int32_t *pids, int64_t *counts);
/* cdef-end */

#endif
