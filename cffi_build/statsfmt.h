/*
 * statsfmt: render the JSON text of a QMP stats reply straight from KVM data blocks.
 *
 * A caller-built program of ops interleaves literal text (QEMU-formatted keys, names and
 * punctuation, prepared once per reply shape) with u64 values taken from the bulk-read
 * buffer.  The declarations between the cdef markers are read by build_statsread.py.
 */
#ifndef STATSD_QMP_STATSFMT_H
#define STATSD_QMP_STATSFMT_H

#include <stdint.h>

/* cdef-begin */
#define STATSFMT_LITERAL 0      /* arg: offset into literals, count: length in bytes */
#define STATSFMT_U64 1          /* arg: word index; decimal number */
#define STATSFMT_BOOL 2         /* arg: word index; true when the word is not 0 */
#define STATSFMT_LIST 3         /* arg: first word index, count: words; [a, b, ...] */
#define STATSFMT_LIST_REVERSED 4 /* the same words, last first (QEMU's histogram order) */
#define STATSFMT_BASE 5         /* arg: added to the word index of every later value op */
/* Prometheus/OpenMetrics exposition (statsd_qmp.metricsrender): */
#define STATSFMT_SCALED 6       /* arg: word index; count: scale (below); an exact decimal */
#define STATSFMT_CUMULATIVE 7   /* arg: word index; adds the word to the running total and
                                   writes the total; count 1: start a new total first */
#define STATSFMT_TOTAL 8        /* writes the running total */
#define STATSFMT_FLAG 9         /* arg: word index; 1 when the word is not 0, else 0 */
#define STATSFMT_SET_LABELS 10  /* arg: offset into literals, count: length; remembered */
#define STATSFMT_LABELS 11      /* writes the remembered literal */
#define STATSFMT_MARK 12        /* arg: index into marks; stores the output position there */

/* STATSFMT_SCALED count: the value is multiplied by 2^shift and by 10^pow10, then written
 * with its last `frac` digits after a decimal point (trailing zeros and a bare point
 * dropped): frac = count & 0xff (<= 40), pow10 = (count >> 8) & 0xff (<= 19),
 * shift = (count >> 16) & 0xff (<= 63). The product always fits in 128 bits. */

struct statsfmt_op {
    uint32_t kind;
    uint32_t count;
    uint64_t arg;
};

/*
 * Run `n_ops` ops against `words` (n_words u64) and `literals`, writing into `out`.
 * Returns the bytes written, or -(bytes needed) when `out_cap` is too small (nothing useful is
 * in `out` then), or -1 for an op that points outside `words` or `literals` (never read out of
 * bounds).  Never allocates.
 */
int64_t statsfmt_render(const uint64_t *words, uint64_t n_words,
                        const uint8_t *literals, uint64_t literals_len,
                        const struct statsfmt_op *ops, uint32_t n_ops,
                        uint8_t *out, uint64_t out_cap);

/* The same, also storing output positions for STATSFMT_MARK ops into `marks` (n_marks
 * entries; a mark index outside them is an out-of-bounds op). */
int64_t statsfmt_render_marked(const uint64_t *words, uint64_t n_words,
                               const uint8_t *literals, uint64_t literals_len,
                               const struct statsfmt_op *ops, uint32_t n_ops,
                               uint8_t *out, uint64_t out_cap,
                               uint64_t *marks, uint32_t n_marks);

/*
 * Interleave pieces of several rendered texts: for each family f from family_begin to
 * family_end - 1 (of n_families), the header bytes headers[header_offsets[f] ..
 * header_offsets[f+1]) followed, for each text t, by texts[t][marks[t*(n_families+1)+f] ..
 * marks[t*(n_families+1)+f+1]).  A family whose pieces are all empty is left out, header
 * included.  Returns the bytes written, or -(bytes needed) when out_cap is too small, or -1
 * when marks fall outside a text or go backwards, or the range is not within the families.
 * Never allocates.  (A caller writes a long page in several calls, a few families each.)
 */
int64_t statsfmt_gather(uint32_t n_texts, const uint8_t *const *texts,
                        const uint64_t *text_lens, const uint64_t *marks,
                        uint32_t n_families, const uint8_t *headers,
                        const uint64_t *header_offsets, uint32_t family_begin,
                        uint32_t family_end, uint8_t *out, uint64_t out_cap);
/* cdef-end */

#endif
