/* JSON rendering of stats replies from data blocks; see statsfmt.h for the contract. */
#include "statsfmt.h"

#include <string.h>

#define U64_DIGITS 20
#define U128_DIGITS 39
#define MAX_FRAC 40
#define MAX_POW10 19
#define MAX_SHIFT 63

typedef unsigned __int128 u128;

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

/* Write `value` scaled as STATSFMT_SCALED's count says; returns the bytes written. */
static unsigned int put_scaled(uint8_t *dest, uint64_t value, uint32_t scale)
{
    unsigned int frac = scale & 0xff;
    unsigned int pow10 = (scale >> 8) & 0xff;
    unsigned int shift = (scale >> 16) & 0xff;
    u128 number = (u128)value << shift;
    uint8_t digits[U128_DIGITS + MAX_FRAC + 1];
    unsigned int n = 0;
    unsigned int p = 0;

    for (unsigned int i = 0; i < pow10; i++)
        number *= 10;
    do {
        digits[n++] = (uint8_t)('0' + (unsigned int)(number % 10));
        number /= 10;
    } while (number);
    /* digits[] is least significant first; pad so that there is an integer digit */
    while (n <= frac)
        digits[n++] = '0';
    /* drop trailing zeros of the fraction (the lowest digits) */
    unsigned int low = 0;
    while (low < frac && digits[low] == '0')
        low++;
    for (unsigned int i = n; i > frac; i--)
        dest[p++] = digits[i - 1];
    if (low < frac) {
        dest[p++] = '.';
        for (unsigned int i = frac; i > low; i--)
            dest[p++] = digits[i - 1];
    }
    return p;
}

static int scale_valid(uint32_t scale)
{
    return (scale & 0xff) <= MAX_FRAC && ((scale >> 8) & 0xff) <= MAX_POW10 &&
           ((scale >> 16) & 0xff) <= MAX_SHIFT && (scale >> 24) == 0 &&
           !(((scale >> 8) & 0xff) && ((scale >> 16) & 0xff));
}

/* The most bytes one op can produce, to check room before writing. */
static uint64_t op_bound(const struct statsfmt_op *op, uint64_t labels_len)
{
    switch (op->kind) {
    case STATSFMT_SCALED:
        return U128_DIGITS + MAX_FRAC + 2;
    case STATSFMT_CUMULATIVE:
    case STATSFMT_TOTAL:
        return U64_DIGITS;
    case STATSFMT_FLAG:
        return 1;
    case STATSFMT_LABELS:
        return labels_len;
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
                        uint64_t literals_len, uint32_t n_marks)
{
    uint64_t room = n_words - base; /* words from base to the end of the buffer */

    switch (op->kind) {
    case STATSFMT_LITERAL:
        return op->arg <= literals_len && op->count <= literals_len - op->arg;
    case STATSFMT_U64:
    case STATSFMT_BOOL:
    case STATSFMT_FLAG:
    case STATSFMT_CUMULATIVE:
        return op->arg < room;
    case STATSFMT_SCALED:
        return op->arg < room && scale_valid(op->count);
    case STATSFMT_TOTAL:
    case STATSFMT_LABELS:
        return 1;
    case STATSFMT_SET_LABELS:
        return op->arg <= literals_len && op->count <= literals_len - op->arg;
    case STATSFMT_MARK:
        return op->arg < n_marks;
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
    return statsfmt_render_marked(words, n_words, literals, literals_len, ops, n_ops, out,
                                  out_cap, NULL, 0);
}

int64_t statsfmt_render_marked(const uint64_t *words, uint64_t n_words,
                               const uint8_t *literals, uint64_t literals_len,
                               const struct statsfmt_op *ops, uint32_t n_ops,
                               uint8_t *out, uint64_t out_cap,
                               uint64_t *marks, uint32_t n_marks)
{
    uint64_t needed = 0;
    uint64_t base = 0;
    uint64_t labels_len = 0;

    /* One pass to validate and size, so the writing pass needs no checks. */
    for (uint32_t i = 0; i < n_ops; i++) {
        if (!op_in_bounds(&ops[i], base, n_words, literals_len, n_marks))
            return -1;
        if (ops[i].kind == STATSFMT_BASE)
            base = ops[i].arg;
        else if (ops[i].kind == STATSFMT_SET_LABELS)
            labels_len = ops[i].count;
        needed += op_bound(&ops[i], labels_len);
    }
    if (needed > out_cap)
        return -(int64_t)needed;

    uint8_t *p = out;
    const uint64_t *at = words; /* words + base */
    const uint8_t *labels = literals;
    uint64_t total = 0;

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
        case STATSFMT_SCALED:
            /* most stats need no scaling: skip the 128-bit arithmetic for them */
            p += op->count ? put_scaled(p, at[op->arg], op->count) : put_u64(p, at[op->arg]);
            break;
        case STATSFMT_CUMULATIVE:
            if (op->count)
                total = 0;
            total += at[op->arg];
            p += put_u64(p, total);
            break;
        case STATSFMT_TOTAL:
            p += put_u64(p, total);
            break;
        case STATSFMT_FLAG:
            *p++ = at[op->arg] ? '1' : '0';
            break;
        case STATSFMT_SET_LABELS:
            labels = literals + op->arg;
            labels_len = op->count;
            break;
        case STATSFMT_LABELS:
            memcpy(p, labels, labels_len);
            p += labels_len;
            break;
        case STATSFMT_MARK:
            marks[op->arg] = (uint64_t)(p - out);
            break;
        }
    }
    return (int64_t)(p - out);
}

int64_t statsfmt_gather(uint32_t n_texts, const uint8_t *const *texts,
                        const uint64_t *text_lens, const uint64_t *marks,
                        uint32_t n_families, const uint8_t *headers,
                        const uint64_t *header_offsets, uint32_t family_begin,
                        uint32_t family_end, uint8_t *out, uint64_t out_cap)
{
    uint64_t stride = (uint64_t)n_families + 1;
    uint64_t needed = 0;

    if (family_begin > family_end || family_end > n_families)
        return -1;
    for (uint32_t t = 0; t < n_texts; t++) {
        const uint64_t *m = marks + t * stride;

        for (uint32_t f = 0; f < n_families; f++)
            if (m[f] > m[f + 1])
                return -1;
        if (m[n_families] > text_lens[t])
            return -1;
        needed += m[family_end] - m[family_begin];
    }
    for (uint32_t f = family_begin; f < family_end; f++) {
        if (header_offsets[f] > header_offsets[f + 1])
            return -1;
        needed += header_offsets[f + 1] - header_offsets[f];
    }
    if (needed > out_cap)
        return -(int64_t)needed;

    uint8_t *p = out;

    for (uint32_t f = family_begin; f < family_end; f++) {
        uint64_t family_bytes = 0;

        for (uint32_t t = 0; t < n_texts; t++)
            family_bytes += marks[t * stride + f + 1] - marks[t * stride + f];
        if (!family_bytes)
            continue;
        memcpy(p, headers + header_offsets[f], header_offsets[f + 1] - header_offsets[f]);
        p += header_offsets[f + 1] - header_offsets[f];
        for (uint32_t t = 0; t < n_texts; t++) {
            uint64_t start = marks[t * stride + f];
            uint64_t length = marks[t * stride + f + 1] - start;

            memcpy(p, texts[t] + start, length);
            p += length;
        }
    }
    return (int64_t)(p - out);
}
