/* Bulk pread of KVM binary-stats fds; see statsread.h for the contract. */
#include "statsread.h"

#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* Fill one region, retrying on EINTR and continuing after a short read: a stats file may be
 * read at any offset and length (binary_stats.c clips at the end of file and returns 0 past
 * it), so a short read only ends at end of file. */
static int64_t read_region(int fd, uint64_t offset, uint32_t length, uint8_t *dest)
{
    uint64_t done = 0;

    while (done < length) {
        ssize_t got = pread(fd, dest + done, length - done, (off_t)(offset + done));

        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -(int64_t)errno;
        }
        if (got == 0)
            break;
        done += (uint64_t)got;
    }
    return (int64_t)done;
}

int statsread_bulk(int count, const int *fds, const uint64_t *offsets,
                   const uint32_t *lengths, const uint64_t *dest_offsets,
                   uint8_t *buf, uint64_t buf_len, int64_t *results)
{
    int complete = 0;

    for (int i = 0; i < count; i++) {
        uint64_t start = dest_offsets[i];

        /* Written so that neither sum can wrap: start <= buf_len is checked first. */
        if (start > buf_len || lengths[i] > buf_len - start) {
            results[i] = -EINVAL;
            continue;
        }
        results[i] = read_region(fds[i], offsets[i], lengths[i], buf + start);
        if (results[i] == (int64_t)lengths[i])
            complete++;
    }
    return complete;
}

int statsread_abi_version(void)
{
    return STATSREAD_ABI_VERSION;
}

int statsread_fd_counts(int count, const int32_t *pids, int64_t *counts)
{
    char path[32];
    struct stat info;

    for (int i = 0; i < count; i++) {
        snprintf(path, sizeof(path), "/proc/%d/fd", (int)pids[i]);
        counts[i] = stat(path, &info) == 0 ? (int64_t)info.st_size : -(int64_t)errno;
    }
    return count;
}
