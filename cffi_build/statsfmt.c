/* JSON rendering of stats replies from data blocks; see statsfmt.h for the contract. */
#include "statsfmt.h"

#include <string.h>

#define U64_DIGITS 20

/* Write `value` in decimal at `dest`; returns the number of digits (1..20). */
static unsigned int put_u64(uint8_t *dest, uint64_t value)
{
    uint8_t digits[U64_DIGITS];
    unsigned int n = 0;

    do {
        digits[n++] = (uint8_t)('0' + value % 10);
        value /= 10;
    } while (value);
    for (unsigned int i = 0; i < n; i++)
        dest[i] = digits[n - 1 - i];
    return n;
}

/* The most bytes one op can produce, to check room before writing. */
static uint64_t op_bound(const struct statsfmt_op *op)
{
    switch (op->kind) {
    case STATSFMT_LITERAL:
        return op->count;
    case STATSFMT_U64:
        return U64_DIGITS;
    case STATSFMT_BOOL:
        return 5; /* "false" */
    case STATSFMT_LIST:
    case STATSFMT_LIST_REVERSED:
        /* "[" + count numbers + ", " between + "]" */
        return 2 + (uint64_t)op->count * (U64_DIGITS + 2);
    default:
        return 0;
    }
}

/* `base` is the word base in force for this op (always <= n_words, see STATSFMT_BASE). */
static int op_in_bounds(const struct statsfmt_op *op, uint64_t base, uint64_t n_words,
                        uint64_t literals_len)
{
    uint64_t room = n_words - base; /* words from base to the end of the buffer */

    switch (op->kind) {
    case STATSFMT_LITERAL:
        return op->arg <= literals_len && op->count <= literals_len - op->arg;
    case STATSFMT_U64:
    case STATSFMT_BOOL:
        return op->arg < room;
    case STATSFMT_LIST:
    case STATSFMT_LIST_REVERSED:
        return op->arg <= room && op->count <= room - op->arg;
    case STATSFMT_BASE:
        return op->arg <= n_words;
    default:
        return 0;
    }
}

int64_t statsfmt_render(const uint64_t *words, uint64_t n_words,
                        const uint8_t *literals, uint64_t literals_len,
                        const struct statsfmt_op *ops, uint32_t n_ops,
                        uint8_t *out, uint64_t out_cap)
{
    uint64_t needed = 0;
    uint64_t base = 0;

    /* One pass to validate and size, so the writing pass needs no checks. */
    for (uint32_t i = 0; i < n_ops; i++) {
        if (!op_in_bounds(&ops[i], base, n_words, literals_len))
            return -1;
        if (ops[i].kind == STATSFMT_BASE)
            base = ops[i].arg;
        needed += op_bound(&ops[i]);
    }
    if (needed > out_cap)
        return -(int64_t)needed;

    uint8_t *p = out;
    const uint64_t *at = words; /* words + base */

    for (uint32_t i = 0; i < n_ops; i++) {
        const struct statsfmt_op *op = &ops[i];

        switch (op->kind) {
        case STATSFMT_BASE:
            at = words + op->arg;
            break;
        case STATSFMT_LITERAL:
            memcpy(p, literals + op->arg, op->count);
            p += op->count;
            break;
        case STATSFMT_U64:
            p += put_u64(p, at[op->arg]);
            break;
        case STATSFMT_BOOL:
            if (at[op->arg]) {
                memcpy(p, "true", 4);
                p += 4;
            } else {
                memcpy(p, "false", 5);
                p += 5;
            }
            break;
        case STATSFMT_LIST:
        case STATSFMT_LIST_REVERSED: {
            int reversed = op->kind == STATSFMT_LIST_REVERSED;

            *p++ = '[';
            for (uint32_t j = 0; j < op->count; j++) {
                uint64_t index = reversed ? op->arg + op->count - 1 - j : op->arg + j;

                if (j) {
                    *p++ = ',';
                    *p++ = ' ';
                }
                p += put_u64(p, at[index]);
            }
            *p++ = ']';
            break;
        }
        }
    }
    return (int64_t)(p - out);
}
