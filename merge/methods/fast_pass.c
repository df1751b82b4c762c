/* The fast pass of merge/methods/exact.py in one loop: each input is read once and the output written once,
 * instead of ~17 torch ops each making its own pass over memory. Same arithmetic, same error bound,
 * same answer; merge/methods/exact.py has the reasoning. Built and loaded by merge/methods/fast_kernel.py.
 *
 * For each element i:  estimate = sum_j c_j * y_j[i]   bound = absolute + sum_j b_j * |y_j[i]|
 * (in the fast type: float for 16-bit outputs, double for float outputs). out[i] takes the rounding of
 * estimate + bound. Where estimate - bound rounds to the adjacent value below, the element is decided
 * exactly here (decide(); mostly exact ties). Where it rounds further away, or the bound allows an
 * overflow of the fast type and out[i] is not finite (inf - inf is NaN), i goes to `where`, with that
 * rounding in `low` and the estimate in `estimate`, for merge/methods/exact.py to settle.
 *
 * Longer than the project's ~400 lines: one source is one library, built at run time and cached by the
 * source's hash (fast_kernel.py); the other methods' passes follow, a section each, in the order of
 * merge/methods (magnitude histograms, sign-electing merges, sparse masks, SCE, spherical, DELLA).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BF16 = 0, F16 = 1, F32 = 2 }; /* dtype codes, as merge/methods/fast_kernel.py passes them */
enum { BLOCK = 256 };                /* elements per inner loop: its buffers stay in L1 */

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && __GNUC__ >= 11
/* One build for every x86-64 machine; the loader picks the widest vectors this one has (AVX-512:
 * faster than AVX2 on a 3-model bf16 mean here). */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

static inline float float_of(uint32_t bits) { float f; memcpy(&f, &bits, 4); return f; }
static inline uint32_t bits_of(float f) { uint32_t b; memcpy(&b, &f, 4); return b; }

static inline float from_bf16(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline float from_f16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, rest = h & 0x7fff;
    /* Shifted into float's layout, a half's bits read as its value times 2**-112, subnormals included:
     * the multiplication by a power of two is exact. Infinity and NaN keep float's top exponent. */
    float magnitude = rest >= 0x7c00 ? float_of(0x7f800000 | (rest & 0x3ff) << 13) : float_of(rest << 13) * 0x1p112f;
    return float_of(bits_of(magnitude) | sign);
}

/* float to bfloat16 (and to half below), rounded to nearest, ties to even; overflow gives infinity. */
static inline uint16_t to_bf16(float f) {
    uint32_t b = bits_of(f);
    if ((b & 0x7fffffff) > 0x7f800000) return (uint16_t)(b >> 16 | 0x40); /* NaN stays NaN */
    b += 0x7fff + (b >> 16 & 1); /* carries into the kept half exactly when rounding up */
    return (uint16_t)(b >> 16);
}

static inline uint16_t to_f16(float f) {
    uint32_t b = bits_of(f), a = b & 0x7fffffff;
    uint16_t sign = (uint16_t)(b >> 16 & 0x8000);
    if (a > 0x7f800000) return sign | 0x7e00;
    if (a >= 0x477ff000) return sign | 0x7c00; /* from 65520 (half past 65504) on: infinity */
    if (a < 0x38800000) {                      /* below 2**-14: a multiple of 2**-24 */
        /* Scaled by 2**24 exactly, then rounded to an integer by the hardware (adding 2**23 leaves
         * no fraction bits; without -ffast-math the compiler keeps both steps); 1024 is the smallest
         * normal half, whose bits are also 1024. */
        float scaled = float_of(a) * 0x1p24f;
        return sign | (uint16_t)((scaled + 0x1p23f) - 0x1p23f);
    }
    a -= (127 - 15) << 23; /* rebias the exponent, then round away 13 bits like to_bf16 */
    a += 0xfff + (a >> 13 & 1);
    return sign | (uint16_t)(a >> 13);
}

/* Element i of an input as stored, bfloat16 (code BF16) or float (F32), as a float: the passes that read
 * their inputs as stored are inlined with a constant code, so each of their loops is built once per type. */
static inline __attribute__((always_inline)) float stored_float(const void *x, int64_t i, int code) {
    return code == BF16 ? from_bf16(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline double from_16(uint16_t h, int code) { return code == BF16 ? from_bf16(h) : from_f16(h); }

static inline double load_one(const void *y, int code, int64_t i) {
    if (code == BF16) return from_bf16(((const uint16_t *)y)[i]);
    if (code == F16) return from_f16(((const uint16_t *)y)[i]);
    return ((const float *)y)[i];
}

/* The exact decision (merge/methods/exact.py's _decide, in its usual case: the value lies between two adjacent
 * finite nonzero outputs low < high, the inputs are finite). Which side of their midpoint m is
 * sum_j c_j y_j / d? The c_j and d are integers given as sums of 26-bit doubles, so every product with
 * an input (24 bits) or with m (25 bits) is an exact double. The sign of their sum is that of the plain
 * sum where every addition was exact; otherwise it comes from Shewchuk's grow-expansion: error-free
 * two-sums keep the sum as nonoverlapping components of increasing magnitude, and the largest nonzero
 * one has the sum's sign. */
typedef struct {
    int k;
    const void *const *ys;
    const int *codes;
    const double *parts; /* each coefficient's parts, then the divisor's */
    const int *counts;   /* how many parts each coefficient has, then the divisor */
    int positive;        /* d > 0 */
} Exact;

enum { MAX_TERMS = 64 };

/* 1 and *high_wins set, or 0 where this case does not apply (left to merge/methods/exact.py). */
static inline int decide(const Exact *x, int64_t i, double low, double high, int low_is_odd, int *high_wins) {
    if (!isfinite(low) || !isfinite(high) || low == 0 || high == 0) return 0;
    double terms[MAX_TERMS], sum = 0;
    int t = 0, inexact = 0;
    const double *part = x->parts;
    double middle = (low + high) / 2; /* exact: one bit more than the output has */
    for (int j = 0; j <= x->k; j++) {
        if (t + x->counts[j] > MAX_TERMS) return 0;
        double v = j < x->k ? load_one(x->ys[j], x->codes[j], i) : -middle;
        if (!isfinite(v)) return 0;
        for (int p = 0; p < x->counts[j]; p++) {
            /* Mostly (ties of a few short inputs) the plain sum is already exact: a two-sum's error
             * term tells, and only otherwise is the expansion built. */
            double term = *part++ * v, next = sum + term, back = next - sum;
            inexact |= ((sum - (next - back)) + (term - back)) != 0;
            terms[t++] = term, sum = next;
        }
    }
    int sign = (sum > 0) - (sum < 0);
    if (inexact) {
        double expansion[MAX_TERMS];
        int size = 0;
        for (int a = 0; a < t; a++) {
            double q = terms[a];
            for (int e = 0; e < size; e++) { /* two-sum: q + expansion[e] = s + error, exactly */
                double s = q + expansion[e], back = s - q;
                expansion[e] = (q - (s - back)) + (expansion[e] - back);
                q = s;
            }
            expansion[size++] = q;
        }
        sign = 0;
        for (int e = size - 1; e >= 0 && sign == 0; e--) sign = (expansion[e] > 0) - (expansion[e] < 0);
    }
    if (!x->positive) sign = -sign;
    *high_wins = sign > 0 || (sign == 0 && low_is_odd); /* a tie goes to the even one */
    return 1;
}

/* The input type when decide_simple() applies (16-bit inputs of one type, each coefficient and the
 * divisor a single part: any weights whose ratios are small integers), else -1. */
static int simple_case(int k, const int *codes, const int *counts) {
    for (int j = 0; j < k; j++)
        if (codes[j] != codes[0] || codes[j] == F32 || counts[j] != 1) return -1;
    return counts[k] == 1 ? codes[0] : -1;
}

/* decide() in its commonest case, without its branches: each c_j y_j and m d is one exact product,
 * and the plain sum of the k + 1 is exact (two-sums tell). 0 where that does not hold: decide() then. */
static inline int decide_simple(const Exact *x, int code, int64_t i, double low, double high, int low_is_odd,
                                int *high_wins) {
    double middle = (low + high) / 2, sum = 0;
    int inexact = low == 0 || high == 0;
    for (int j = 0; j <= x->k; j++) {
        double v = j < x->k ? from_16(((const uint16_t *)x->ys[j])[i], code) : -middle;
        double term = x->parts[j] * v, next = sum + term, back = next - sum;
        inexact |= !(((sum - (next - back)) + (term - back)) == 0); /* NaN from an infinite input too */
        sum = next;
    }
    int sign = (sum > 0) - (sum < 0);
    if (!x->positive) sign = -sign;
    *high_wins = sign > 0 || (sign == 0 && low_is_odd);
    return !inexact;
}

/* The next value up from a finite 16- or 32-bit float, on its bits (sign-magnitude). */
static inline uint32_t next_up(uint32_t bits, uint32_t sign_bit) {
    if (bits == sign_bit) return 1; /* -0 */
    return bits & sign_bit ? bits - 1 : bits + 1;
}


/* The positions of the nonzero flags among the first count (flagged has room for 8 more), eight
 * flags at a time: a block has a few, and a branch per element mispredicted at nearly every one. */
static inline int gather(uint8_t *flagged, int count, int *gathered) {
    int m = 0;
    memset(flagged + count, 0, 8);
    for (int i0 = 0; i0 < count; i0 += 8) {
        uint64_t word;
        memcpy(&word, flagged + i0, 8);
        for (; word; word &= word - 1) gathered[m++] = i0 + __builtin_ctzll(word) / 8;
    }
    return m;
}

/* Inlined so that each MULTIVERSION clone of its caller gets its own vectorised copy. */
static inline __attribute__((always_inline)) void load_float(const void *y, int code, int64_t start, int count, float *to) {
    if (code == BF16) {
        const uint16_t *h = (const uint16_t *)y + start;
        for (int i = 0; i < count; i++) to[i] = from_bf16(h[i]);
    } else if (code == F16) {
        const uint16_t *h = (const uint16_t *)y + start;
        for (int i = 0; i < count; i++) to[i] = from_f16(h[i]);
    } else {
        memcpy(to, (const float *)y + start, (size_t)count * sizeof(float));
    }
}

static void load_double(const void *y, int code, int64_t start, int count, double *to) {
    float wide[BLOCK];
    load_float(y, code, start, count, wide);
    for (int i = 0; i < count; i++) to[i] = wide[i];
}

/* 16-bit outputs, computed in float. Returns how many elements went to `where`. */
MULTIVERSION
int64_t fast_pass_float(int k, const void *const *ys, const int *codes, const double *scaled, double factor,
                        double absolute, double overflow_risk, const double *parts, const int *counts,
                        int positive, int out_code, uint16_t *out, int64_t n, int64_t *where, uint16_t *low,
                        float *estimate) {
    const Exact exact = {k, ys, codes, parts, counts, positive};
    float c[k], b[k];
    for (int j = 0; j < k; j++) {
        c[j] = (float)scaled[j]; /* as torch's add_(y, alpha=c) rounds alpha */
        b[j] = (float)(fabs(scaled[j]) * factor);
    }
    const float risk = (float)overflow_risk;
    const int simple = simple_case(k, codes, counts);
    int64_t unsure = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float sum[BLOCK], err[BLOCK], y[BLOCK];
        for (int i = 0; i < count; i++) sum[i] = 0.0f, err[i] = (float)absolute;
        for (int j = 0; j < k; j++) {
            load_float(ys[j], codes[j], start, count, y);
            for (int i = 0; i < count; i++) {
                sum[i] += c[j] * y[i];
                err[i] += b[j] * fabsf(y[i]);
            }
        }
        uint16_t high[BLOCK], under[BLOCK];
        if (out_code == BF16) {
            for (int i = 0; i < count; i++) high[i] = to_bf16(sum[i] + err[i]), under[i] = to_bf16(sum[i] - err[i]);
        } else {
            for (int i = 0; i < count; i++) high[i] = to_f16(sum[i] + err[i]), under[i] = to_f16(sum[i] - err[i]);
        }
        memcpy(out + start, high, (size_t)count * sizeof(uint16_t));
        /* Which elements need a closer look (a few percent: mostly exact ties), flagged in one
         * vectorised pass, gathered, then settled. A test per element in one scalar loop cost more than
         * all the arithmetic (2.6 against 1.7 ns per element of a 3-model bf16 mean). */
        const uint16_t infinity = out_code == BF16 ? 0x7f80 : 0x7c00;
        uint8_t flagged[BLOCK + 8];
        for (int i = 0; i < count; i++)
            flagged[i] = (high[i] != under[i]) | (((high[i] & 0x7fff) >= infinity) & (err[i] >= risk));
        int gathered[BLOCK], m = gather(flagged, count, gathered);
        for (int g = 0; g < m; g++) {
            int i = gathered[g], high_wins;
            int adjacent = (high[i] & 0x7fff) < infinity && next_up(under[i], 0x8000) == high[i];
            double below = from_16(under[i], out_code), above = from_16(high[i], out_code);
            if (adjacent && ((simple >= 0 && decide_simple(&exact, simple, start + i, below, above, under[i] & 1, &high_wins)) ||
                             decide(&exact, start + i, below, above, under[i] & 1, &high_wins))) {
                out[start + i] = high_wins ? high[i] : under[i];
            } else {
                where[unsure] = start + i, low[unsure] = under[i], estimate[unsure] = sum[i];
                unsure++;
            }
        }
    }
    return unsure;
}

/* float outputs, computed in double. */
MULTIVERSION
int64_t fast_pass_double(int k, const void *const *ys, const int *codes, const double *scaled, double factor,
                         double absolute, double overflow_risk, const double *parts, const int *counts,
                         int positive, float *out, int64_t n, int64_t *where, float *low, double *estimate) {
    const Exact exact = {k, ys, codes, parts, counts, positive};
    double b[k];
    for (int j = 0; j < k; j++) b[j] = fabs(scaled[j]) * factor;
    const int simple = simple_case(k, codes, counts);
    int64_t unsure = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        double sum[BLOCK], err[BLOCK], y[BLOCK];
        for (int i = 0; i < count; i++) sum[i] = 0.0, err[i] = absolute;
        for (int j = 0; j < k; j++) {
            load_double(ys[j], codes[j], start, count, y);
            for (int i = 0; i < count; i++) {
                sum[i] += scaled[j] * y[i];
                err[i] += b[j] * fabs(y[i]);
            }
        }
        float high[BLOCK], under[BLOCK];
        uint8_t flagged[BLOCK + 8]; /* as in fast_pass_float */
        for (int i = 0; i < count; i++) {
            high[i] = (float)(sum[i] + err[i]), under[i] = (float)(sum[i] - err[i]);
            flagged[i] = (bits_of(high[i]) != bits_of(under[i])) | (!isfinite(high[i]) & (err[i] >= overflow_risk));
        }
        memcpy(out + start, high, (size_t)count * sizeof(float));
        int gathered[BLOCK], m = gather(flagged, count, gathered);
        for (int g = 0; g < m; g++) {
            int i = gathered[g], high_wins;
            uint32_t high_bits = bits_of(high[i]), under_bits = bits_of(under[i]);
            int adjacent = isfinite(high[i]) && next_up(under_bits, 0x80000000u) == high_bits;
            if (adjacent && ((simple >= 0 && decide_simple(&exact, simple, start + i, under[i], high[i], under_bits & 1, &high_wins)) ||
                             decide(&exact, start + i, under[i], high[i], under_bits & 1, &high_wins))) {
                out[start + i] = high_wins ? high[i] : under[i];
            } else {
                where[unsure] = start + i, low[unsure] = under[i], estimate[unsure] = sum[i];
                unsure++;
            }
        }
    }
    return unsure;
}

/* Magnitude histograms for merge/methods/magnitude.py: the bits of |v| (sign cleared) order like the
 * value, so counting their high 16 bits, then the low 16 bits of those in one high bin, finds the k-th
 * largest |v| exactly. The high count goes into WAYS interleaved histograms the caller holds for the
 * whole pass and sums at its end: neighbouring weights share a bin so often that one histogram would
 * wait on its own last increment, and summing (or allocating) 4 x 65536 counters on every block of
 * 2^18 cost a third as much again as the count. */
enum { BINS = 1 << 16, WAYS = 4 };

/* |v[i]| as bits, or |v[i] - base[i]| (the fp32 difference, as torch's of the inputs widened to fp32)
 * where base is not NULL; v and base both bfloat16 (code BF16: read as stored, a statistic pass need not
 * widen its blocks first) or float. Inlined with a constant code, so each loop below is built once per type. */
static inline __attribute__((always_inline)) uint32_t magnitude(const void *v, const void *base, int64_t i, int code) {
    float x = stored_float(v, i, code);
    if (base) x = x - stored_float(base, i, code);
    return bits_of(x) & 0x7fffffffu;
}

static inline __attribute__((always_inline)) int64_t high_histogram(const void *v, const void *base, int64_t n,
                                                                    int64_t *ways, int code) {
    int64_t zeros = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        /* The magnitudes first, a loop that vectorises (bfloat16's widening in it), then the counting:
         * 0.36 ns an element from bfloat16, 0.40 from float; computed in the counting loop, 0.88 and 0.54. */
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK, i = 0;
        uint32_t a[BLOCK];
        for (int j = 0; j < count; j++) a[j] = magnitude(v, base, start + j, code);
        for (; i + WAYS <= count; i += WAYS)
            for (int w = 0; w < WAYS; w++) ways[w * BINS + (a[i + w] >> 16)]++, zeros += a[i + w] == 0;
        for (; i < count; i++) ways[a[i] >> 16]++, zeros += a[i] == 0;
    }
    return n - zeros;
}

/* Adds the high-bits histogram of the magnitudes (v, or v - base) of [0, n) to ways (WAYS x BINS
 * counters, summed by the caller); returns how many are not zero (NaN counts). */
MULTIVERSION
int64_t magnitude_high_histogram(const void *v, const void *base, int code, int64_t n, int64_t *ways) {
    return code == BF16 ? high_histogram(v, base, n, ways, BF16) : high_histogram(v, base, n, ways, F32);
}

static inline __attribute__((always_inline)) int64_t low_histogram(const void *v, const void *base, int64_t n,
                                                                   uint32_t high, int64_t *hist, int code) {
    int64_t found = 0;
    for (int64_t start = 0; start < n; start += BLOCK) {
        /* Few elements fall in the one bin: the magnitudes of a block first (vectorised), then each group
         * of 64 tested with vector compares, and only a group holding one counted element by element
         * (0.14 ns an element here, against 0.53 element by element throughout). */
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK, i = 0;
        uint32_t a[BLOCK];
        for (int j = 0; j < count; j++) a[j] = magnitude(v, base, start + j, code);
        for (; i + 64 <= count; i += 64) {
            uint32_t hit = 0;
            for (int w = 0; w < 64; w++) hit |= (a[i + w] >> 16) == high;
            if (hit)
                for (int w = 0; w < 64; w++)
                    if ((a[i + w] >> 16) == high) hist[a[i + w] & 0xffffu]++, found++;
        }
        for (; i < count; i++)
            if ((a[i] >> 16) == high) hist[a[i] & 0xffffu]++, found++;
    }
    return found;
}

/* Adds the low-bits histogram of the magnitudes whose high 16 bits are `high` to hist; returns their count. */
MULTIVERSION
int64_t magnitude_low_histogram(const void *v, const void *base, int code, int64_t n, int high, int64_t *hist) {
    return code == BF16 ? low_histogram(v, base, n, (uint32_t)high, hist, BF16)
                        : low_histogram(v, base, n, (uint32_t)high, hist, F32);
}

/* The sign-electing merges' last pass, op for op in fp32 as the torch code they replace (which is
 * mergekit's order), so the result is the same to the bit; the torch code stays where there is no
 * compiler or more than MAX_MODELS task vectors. A torch reduction over a stack adds from +0.0 in
 * model order; torch.sign(NaN) is 0. */
enum { MAX_MODELS = 8 };

static inline float sign_of(float x) { return (float)((x > 0) - (x < 0)); }

/* x where cond, else +0.0: a mask of bits, no branch (random data would mispredict half of them). */
static inline float kept(int cond, float x) { return float_of(bits_of(x) & (0u - (uint32_t)cond)); }

/* merge.methods.registry.ties: base + scale * the disjoint mean of the task vectors x_j - base kept
 * where |x_j - base| >= threshold_j. xs: base, then the k models. */
MULTIVERSION
void ties_merge(int k, const float *const *xs, const float *thresholds, const float *weights, float scale,
                int64_t n, float *out) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *base = xs[0] + start;
        float trimmed[MAX_MODELS][BLOCK], weighted[MAX_MODELS][BLOCK], sum[BLOCK], num[BLOCK], den[BLOCK];
        for (int j = 0; j < k; j++) {
            const float *x = xs[j + 1] + start;
            for (int i = 0; i < count; i++) {
                float d = x[i] - base[i];
                trimmed[j][i] = kept(fabsf(d) >= thresholds[j], d);
                weighted[j][i] = trimmed[j][i] * weights[j];
            }
        }
        for (int i = 0; i < count; i++) sum[i] = weighted[0][i], num[i] = 0.0f, den[i] = 0.0f;
        for (int j = 1; j < k; j++)
            for (int i = 0; i < count; i++) sum[i] = sum[i] + weighted[j][i];
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) {
                int agree = (sign_of(trimmed[j][i]) == sign_of(sum[i])) & (trimmed[j][i] != 0.0f);
                num[i] = num[i] + kept(agree, weighted[j][i]);
                den[i] = den[i] + kept(agree, weights[j]);
            }
        for (int i = 0; i < count; i++) out[start + i] = base[i] + kept(den[i] != 0.0f, num[i] / den[i]) * scale;
    }
}

/* merge.methods.sparse.mix of one block of `count` elements: base + the weighted task vectors' sum (with
 * TIES's election where `ties`: over those agreeing with the sign of the sum, a zero sum positive),
 * divided by the weights' sum where `normalize` (`divisor`, the same for every element, without ties),
 * times scale where scale != 1. tvs[j]: the block of task vector j. */
static inline __attribute__((always_inline)) void mix_block(int k, const float *base, const float *const *tvs,
                                                            const float *weights, int ties, int normalize,
                                                            float divisor, float scale, int count, float *out) {
    float weighted[MAX_MODELS][BLOCK], mixed[BLOCK], den[BLOCK];
    for (int j = 0; j < k; j++)
        for (int i = 0; i < count; i++) weighted[j][i] = tvs[j][i] * weights[j];
    for (int i = 0; i < count; i++) mixed[i] = 0.0f, den[i] = 0.0f;
    if (ties) {
        float majority[BLOCK];
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) mixed[i] = mixed[i] + weighted[j][i];
        for (int i = 0; i < count; i++) majority[i] = mixed[i] >= 0.0f ? 1.0f : -1.0f, mixed[i] = 0.0f;
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) {
                float agree = sign_of(weighted[j][i]) == majority[i] ? 1.0f : 0.0f;
                mixed[i] = mixed[i] + weighted[j][i] * agree;
                den[i] = den[i] + weights[j] * agree;
            }
        for (int i = 0; i < count; i++) den[i] = den[i] == 0.0f ? 1.0f : den[i];
    } else {
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) mixed[i] = mixed[i] + weighted[j][i];
        for (int i = 0; i < count; i++) den[i] = divisor;
    }
    if (normalize)
        for (int i = 0; i < count; i++) mixed[i] = mixed[i] / den[i];
    if (scale != 1.0f)
        for (int i = 0; i < count; i++) mixed[i] = mixed[i] * scale;
    for (int i = 0; i < count; i++) out[i] = base[i] + mixed[i];
}

/* merge.methods.sparse.mix: mix_block over the whole of base and the task vectors tvs. */
MULTIVERSION
void mix_merge(int k, const float *base, const float *const *tvs, const float *weights, int ties, int normalize,
               float divisor, float scale, int64_t n, float *out) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        const float *block[MAX_MODELS];
        for (int j = 0; j < k; j++) block[j] = tvs[j] + start;
        mix_block(k, base + start, block, weights, ties, normalize, divisor, scale, count, out + start);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * Seeded uniform draws (merge.methods.blocks.block_uniform) and DARE's passes over them. Draw i of a
 * block is a function of (key, i) alone, SplitMix64's output function of key + (i + 1) * gamma: no
 * generator state, so the draws vectorise and any slice of a block can be drawn on its own. Its top 24
 * bits make a float in [0, 1) exactly; merge/methods/blocks.py computes the same in torch. */
static inline float uniform_at(uint64_t key, int64_t i) {
    uint64_t z = key + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * 0x1p-24f;
}

MULTIVERSION
void uniform_draws(uint64_t key, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = uniform_at(key, i);
}

/* The sparse methods' masks: which elements of a task vector d = x - base are kept. DARE keeps those
 * whose draw is below density, Breadcrumbs those with lower <= |d| < upper, DELLA those whose bit is 1
 * in its della_keep mask, computed beforehand (element i: bit i % 8 of byte i / 8). */
enum { MASK_WINDOW = 0, MASK_DRAWS = 1, MASK_GIVEN = 2 };
typedef struct {
    int kind;
    uint64_t key;
    float density, lower, upper;
    const uint8_t *given;
} Mask;

/* Elements [start, start + count) of a packed mask as 1.0 and 0.0: a byte's 8 bits at a time where
 * start is whole bytes in (every block is), a loop of constant shifts that vectorises (bit by bit, the
 * unpacking cost 3-4 ns an element, more than deciding DELLA's mask). */
static inline void unpack_bits(const uint8_t *bits, int64_t start, int count, float *keep) {
    int i = 0;
    if ((start & 7) == 0)
        for (const uint8_t *b = bits + (start >> 3); i + 8 <= count; i += 8)
            for (int k = 0; k < 8; k++) keep[i + k] = (float)((b[i >> 3] >> k) & 1u);
    for (; i < count; i++) keep[i] = (float)((bits[(start + i) >> 3] >> ((start + i) & 7)) & 1u);
}

/* The inverse: bits [start, start + count) of a zeroed packed mask set where keep[i] (each 0 or 1) is 1.
 * Eight at a time where start is whole bytes in, by one multiply: it moves byte k's low bit to bit 56 + k,
 * and the products of the other bytes fall outside the top byte and carry nothing into it (a float
 * compare per element, bit by bit, was an eighth of DELLA's mask). */
static inline void pack_bits(const uint8_t *keep, int64_t start, int64_t count, uint8_t *bits) {
    int64_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if ((start & 7) == 0)
        for (uint8_t *b = bits + (start >> 3); i + 8 <= count; i += 8) {
            uint64_t eight;
            memcpy(&eight, keep + i, 8);
            b[i >> 3] = (uint8_t)((eight * 0x0102040810204080ull) >> 56);
        }
#endif
    for (; i < count; i++) bits[(start + i) >> 3] |= (uint8_t)(keep[i] << ((start + i) & 7));
}

/* keep[i] for one block: 1 where d[i] is kept, else 0, for a multiply by it as merge.methods.sparse
 * masks (0 * inf is NaN there too). */
static inline void keep_block(const Mask *mask, int64_t start, int count, const float *d, float *keep) {
    if (mask->kind == MASK_DRAWS)
        for (int i = 0; i < count; i++) keep[i] = uniform_at(mask->key, start + i) < mask->density ? 1.0f : 0.0f;
    else if (mask->kind == MASK_GIVEN)
        unpack_bits(mask->given, start, count, keep);
    else
        for (int i = 0; i < count; i++) keep[i] = (fabsf(d[i]) >= mask->lower) & (fabsf(d[i]) < mask->upper) ? 1.0f : 0.0f;
}

/* The merge of the sparse methods (merge.methods.sparse.random_mask_mix, _breadcrumbs): each task vector
 * x_j - base masked by masks[j], times ratios[j] where rescale[j], then mixed (mix_block), a block at a
 * time: the task vectors stay in L1 instead of being k temporaries of a whole piece, written and read
 * back. xs (base first) are read as stored (bfloat16 or float: code), each task vector the fp32
 * difference of their values, so the merge pass need not widen its blocks first (the widening copies and
 * the page faults of their fresh memory were a tenth of a DELLA merge's CPU time). */
static inline __attribute__((always_inline)) void sparse_merge_of(int k, const void *const *xs, int code,
                                                                  const Mask *masks, const int *rescale,
                                                                  const float *ratios, const float *weights, int ties,
                                                                  int normalize, float divisor, float scale, int64_t n,
                                                                  float *out) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float base[BLOCK], tv[MAX_MODELS][BLOCK], keep[BLOCK];
        const float *tvs[MAX_MODELS];
        for (int i = 0; i < count; i++) base[i] = stored_float(xs[0], start + i, code);
        for (int j = 0; j < k; j++) {
            float *d = tv[j];
            for (int i = 0; i < count; i++) d[i] = stored_float(xs[j + 1], start + i, code) - base[i];
            keep_block(&masks[j], start, count, d, keep);
            if (rescale[j])
                for (int i = 0; i < count; i++) d[i] = d[i] * keep[i] * ratios[j];
            else
                for (int i = 0; i < count; i++) d[i] = d[i] * keep[i];
            tvs[j] = d;
        }
        mix_block(k, base, tvs, weights, ties, normalize, divisor, scale, count, out + start);
    }
}

MULTIVERSION
void sparse_merge(int k, const void *const *xs, int code, const Mask *masks, const int *rescale, const float *ratios,
                  const float *weights, int ties, int normalize, float divisor, float scale, int64_t n, float *out) {
    if (code == BF16)
        sparse_merge_of(k, xs, BF16, masks, rescale, ratios, weights, ties, normalize, divisor, scale, n, out);
    else
        sparse_merge_of(k, xs, F32, masks, rescale, ratios, weights, ties, normalize, divisor, scale, n, out);
}

/* The L1 norms of x - base before and after the mask (sums[0], sums[1]), in double: a block of
 * magnitudes at a time (a loop that vectorises), added into LANES running sums per norm: independent
 * adds, which the compiler may vectorise without reordering any one sum (a single running sum cost
 * 7.5 ns an element, this 0.5). Element i goes to lane i % LANES. x and base are read as stored
 * (bfloat16 or float: code), the task vector the fp32 difference of their values: the statistic passes
 * of DARE, Breadcrumbs and DELLA need not widen their blocks first. */
enum { LANES = 8 };

static inline __attribute__((always_inline)) void masked_l1_of(const void *x, const void *base, int code,
                                                               const Mask *mask, int64_t n, double *sums) {
    double before[LANES] = {0}, after[LANES] = {0};
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float d[BLOCK], keep[BLOCK], whole[BLOCK], masked[BLOCK];
        for (int i = 0; i < count; i++) d[i] = stored_float(x, start + i, code) - stored_float(base, start + i, code);
        keep_block(mask, start, count, d, keep);
        for (int i = 0; i < count; i++) whole[i] = fabsf(d[i]), masked[i] = fabsf(d[i] * keep[i]);
        for (int i = count; i < BLOCK; i++) whole[i] = 0.0f, masked[i] = 0.0f;  /* a short last block */
        for (int i = 0; i < BLOCK; i += LANES)
            for (int w = 0; w < LANES; w++) before[w] += whole[i + w], after[w] += masked[i + w];
    }
    sums[0] = 0.0, sums[1] = 0.0;
    for (int w = 0; w < LANES; w++) sums[0] += before[w], sums[1] += after[w];
}

MULTIVERSION
void masked_l1(const void *x, const void *base, int code, const Mask *mask, int64_t n, double *sums) {
    if (code == BF16)
        masked_l1_of(x, base, BF16, mask, n, sums);
    else
        masked_l1_of(x, base, F32, mask, n, sums);
}

/* ---------------------------------------------------------------------------------------------------
 * SCE (merge.methods.sparse): the variance across the task vectors x_j - base, as torch.var over their
 * stack computes it (Welford in double, model by model), and the two passes that read it. The inputs are
 * read as stored, all bfloat16 or all float (code), each task vector the fp32 difference of the widened
 * values, as the torch code's: the statistic passes and the merge need not widen their blocks first
 * (torch's copies were the largest part of SCE's statistic). Each pass is built once per code. */
static inline __attribute__((always_inline)) float sce_task_vector(const void *const *xs, int j, int64_t i, int code) {
    return stored_float(xs[j], i, code) - stored_float(xs[0], i, code);
}

static inline __attribute__((always_inline)) void sce_variance_block(int k, const void *const *xs, int code, int64_t start,
                                                                     int count, float *variance) {
    double mean[BLOCK], m2[BLOCK];
    for (int i = 0; i < count; i++) mean[i] = 0.0, m2[i] = 0.0;
    for (int j = 1; j <= k; j++) {
        /* Dividing by a power of two is multiplying by its exact inverse (the same rounding of the same
         * quotient), and a multiply vectorises far cheaper than a divide; other counts divide. */
        double inverse = 1.0 / j;
        if ((j & (j - 1)) == 0)
            for (int i = 0; i < count; i++) {
                double x = (double)sce_task_vector(xs, j, start + i, code);
                double delta = x - mean[i];
                mean[i] += delta * inverse;
                m2[i] += delta * (x - mean[i]);
            }
        else
            for (int i = 0; i < count; i++) {
                double x = (double)sce_task_vector(xs, j, start + i, code);
                double delta = x - mean[i];
                mean[i] += delta / j;
                m2[i] += delta * (x - mean[i]);
            }
    }
    if ((k & (k - 1)) == 0)
        for (int i = 0; i < count; i++) variance[i] = (float)(m2[i] * (1.0 / k));
    else
        for (int i = 0; i < count; i++) variance[i] = (float)(m2[i] / k);
}

static inline __attribute__((always_inline)) void sce_variance_of(int k, const void *const *xs, int code, int64_t n,
                                                                  float *out) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        sce_variance_block(k, xs, code, start, count, out + start);
    }
}

/* xs: base, then the k models. */
MULTIVERSION
void sce_variance(int k, const void *const *xs, int code, int64_t n, float *out) {
    if (code == BF16) sce_variance_of(k, xs, BF16, n, out);
    else sce_variance_of(k, xs, F32, n, out);
}

/* Each task vector's elements kept where |variance| >= threshold (all where !select): x_j - base times 1 or 0. */
static inline __attribute__((always_inline)) void sce_selected_block(int k, const void *const *xs, int code, int select,
                                                                     float threshold, int64_t start, int count,
                                                                     float (*tvs)[BLOCK]) {
    float keep[BLOCK];
    if (select) {
        sce_variance_block(k, xs, code, start, count, keep);
        for (int i = 0; i < count; i++) keep[i] = fabsf(keep[i]) >= threshold ? 1.0f : 0.0f;
    } else {
        for (int i = 0; i < count; i++) keep[i] = 1.0f;
    }
    for (int j = 0; j < k; j++)
        for (int i = 0; i < count; i++) tvs[j][i] = sce_task_vector(xs, j + 1, start + i, code) * keep[i];
}

static inline __attribute__((always_inline)) void sce_squares_of(int k, const void *const *xs, int code, int select,
                                                                 float threshold, int64_t n, double *sums) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float tvs[MAX_MODELS][BLOCK];
        sce_selected_block(k, xs, code, select, threshold, start, count, tvs);
        for (int j = 0; j < k; j++) {
            double lanes[LANES] = {0};  /* as in dare_l1 */
            for (int i = count; i < BLOCK; i++) tvs[j][i] = 0.0f;
            for (int i = 0; i < BLOCK; i += LANES)
                for (int w = 0; w < LANES; w++) lanes[w] += (double)(tvs[j][i + w] * tvs[j][i + w]);
            for (int w = 0; w < LANES; w++) sums[j] += lanes[w];
        }
    }
}

/* sums[j] += the fp64 sum of the squares (in float) of selected task vector j. */
MULTIVERSION
void sce_squares(int k, const void *const *xs, int code, int select, float threshold, int64_t n, double *sums) {
    if (code == BF16) sce_squares_of(k, xs, BF16, select, threshold, n, sums);
    else sce_squares_of(k, xs, F32, select, threshold, n, sums);
}

static inline __attribute__((always_inline)) void sce_merge_of(int k, const void *const *xs, int code, int select,
                                                               float threshold, const float *shares, int64_t n, float *out) {
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float tvs[MAX_MODELS][BLOCK], total[BLOCK], num[BLOCK], den[BLOCK];
        sce_selected_block(k, xs, code, select, threshold, start, count, tvs);
        for (int i = 0; i < count; i++) total[i] = 0.0f, num[i] = 0.0f, den[i] = 0.0f;
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) total[i] = total[i] + tvs[j][i];
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++) {
                float erased = shares[j] * (sign_of(tvs[j][i]) == (total[i] >= 0.0f ? 1.0f : -1.0f) ? 1.0f : 0.0f);
                num[i] = num[i] + tvs[j][i] * erased;
                den[i] = den[i] + erased;
            }
        for (int i = 0; i < count; i++)
            out[start + i] = stored_float(xs[0], start + i, code) + num[i] / (den[i] < 1e-6f ? 1e-6f : den[i]);
    }
}

/* base + the selected task vectors' mean weighted by `shares`, over those agreeing in sign with their sum
 * (a zero sum positive), the weights' sum clamped to at least 1e-6. */
MULTIVERSION
void sce_merge(int k, const void *const *xs, int code, int select, float threshold, const float *shares, int64_t n, float *out) {
    if (code == BF16) sce_merge_of(k, xs, BF16, select, threshold, shares, n, out);
    else sce_merge_of(k, xs, F32, select, threshold, shares, n, out);
}

/* ---------------------------------------------------------------------------------------------------
 * The spherical methods (merge.methods.spherical): the Gram matrix their statistics start from, and the
 * elementwise step of Multi-SLERP. */

/* merge.methods.spherical.gram's block: G[a][b] = <v_a, v_b> (row-major k x k, both halves), each product
 * exact in double, added into LANES running sums per pair (summed at the end): fp64 sums in another order
 * than torch.dot's, as accurate. The k vectors v_j are xs[j] or, with a base (xs[0]), xs[j + 1] - base
 * in fp32, as the torch code subtracts before widening; xs as stored (code), so the statistic pass need
 * not widen its blocks first. */
static inline __attribute__((always_inline)) void gram_of(int k, const void *const *xs, int code, int has_base,
                                                          int64_t n, double *gram) {
    const void *const *vs = xs + has_base;
    double sums[MAX_MODELS * (MAX_MODELS + 1) / 2][LANES];
    memset(sums, 0, sizeof sums);
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float v[MAX_MODELS][BLOCK];
        for (int j = 0; j < k; j++) {
            if (has_base)
                for (int i = 0; i < count; i++) v[j][i] = stored_float(vs[j], start + i, code) - stored_float(xs[0], start + i, code);
            else
                for (int i = 0; i < count; i++) v[j][i] = stored_float(vs[j], start + i, code);
            for (int i = count; i < BLOCK; i++) v[j][i] = 0.0f;  /* a short last block */
        }
        for (int a = 0, pair = 0; a < k; a++)
            for (int b = a; b < k; b++, pair++)
                for (int i = 0; i < BLOCK; i += LANES)
                    for (int w = 0; w < LANES; w++) sums[pair][w] += (double)v[a][i + w] * (double)v[b][i + w];
    }
    for (int a = 0, pair = 0; a < k; a++)
        for (int b = a; b < k; b++, pair++) {
            double total = 0.0;
            for (int w = 0; w < LANES; w++) total += sums[pair][w];
            gram[a * k + b] = total, gram[b * k + a] = total;
        }
}

MULTIVERSION
void gram_block(int k, const void *const *xs, int code, int has_base, int64_t n, double *gram) {
    if (code == BF16) gram_of(k, xs, BF16, has_base, n, gram);
    else gram_of(k, xs, F32, has_base, n, gram);
}

/* merge.methods.spherical.multislerp's elementwise step, op for op in fp32 as its torch code, sums over
 * the vectors in their order from +0.0 as the sums above. The k vectors v_j are xs[j] or, with a base
 * (xs[0]), xs[j + 1] - base. With mean_norm (`spherical`): u_j = v_j / divisors_j,
 * mean = (sum_j u_j w_j) / mean_norm, tangent = sum_j (u_j - dots_j mean) w_j,
 * out = (mean cos + tangent sin_ratio) norm; without (two vectors whose weighted mean vanishes):
 * out = v_0 w_0 + v_1 w_1. Plus the base where there is one. */
MULTIVERSION
void multislerp_merge(int k, const float *const *xs, int has_base, const float *weights, const float *divisors,
                      const float *dots, int spherical, float mean_norm, float cos_length, float sin_ratio, float norm,
                      int64_t n, float *out) {
    const float *const *vs = xs + has_base;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int count = n - start < BLOCK ? (int)(n - start) : BLOCK;
        float v[MAX_MODELS][BLOCK], mean[BLOCK], tangent[BLOCK], result[BLOCK];
        for (int j = 0; j < k; j++)
            for (int i = 0; i < count; i++)
                v[j][i] = has_base ? vs[j][start + i] - xs[0][start + i] : vs[j][start + i];
        if (!spherical) {
            for (int i = 0; i < count; i++) result[i] = v[0][i] * weights[0] + v[1][i] * weights[1];
        } else {
            for (int j = 0; j < k; j++)
                for (int i = 0; i < count; i++) v[j][i] = v[j][i] / divisors[j];  /* the unit vectors */
            for (int i = 0; i < count; i++) mean[i] = 0.0f, tangent[i] = 0.0f;
            for (int j = 0; j < k; j++)
                for (int i = 0; i < count; i++) mean[i] = mean[i] + v[j][i] * weights[j];
            for (int i = 0; i < count; i++) mean[i] = mean[i] / mean_norm;
            for (int j = 0; j < k; j++)
                for (int i = 0; i < count; i++) tangent[i] = tangent[i] + (v[j][i] - dots[j] * mean[i]) * weights[j];
            for (int i = 0; i < count; i++) result[i] = (mean[i] * cos_length + tangent[i] * sin_ratio) * norm;
        }
        for (int i = 0; i < count; i++) out[start + i] = has_base ? result[i] + xs[0][start + i] : result[i];
    }
}

/* ---------------------------------------------------------------------------------------------------
 * DELLA (merge/methods/della.py): each element's rank by magnitude within its row of `group` elements
 * (1 for the smallest; equal magnitudes, and NaNs, by position, as a stable sort orders them). A
 * magnitude's key is its bit pattern (for non-negative floats they order like the values; every NaN
 * one key, after inf, as torch sorts them). */
static inline uint32_t rank_key(float d) {
    uint32_t key = bits_of(fabsf(d));
    return key > 0x7F800000u ? 0x7FC00000u : key;
}

/* The ranks of one row's keys: an LSD radix sort, a byte a pass, a pass skipped where every key has the
 * same byte (a few ns an element against torch's argsort, which cost DELLA 40 times the disk's time).
 * scratch: 4 * group words. */
static void radix_ranks(const uint32_t *keys, int64_t group, uint32_t *scratch, uint32_t *ranks) {
    uint32_t *k0 = scratch, *k1 = scratch + group, *o0 = scratch + 2 * group, *o1 = scratch + 3 * group;
    int64_t counts[4][256] = {{0}};
    for (int64_t i = 0; i < group; i++) {
        k0[i] = keys[i];
        o0[i] = (uint32_t)i;
        for (int b = 0; b < 4; b++) counts[b][(keys[i] >> (8 * b)) & 255]++;
    }
    for (int b = 0; b < 4; b++) {
        if (counts[b][(k0[0] >> (8 * b)) & 255] == group) continue;  /* one byte everywhere: no change */
        int64_t next[256], sum = 0;
        for (int v = 0; v < 256; v++) next[v] = sum, sum += counts[b][v];
        for (int64_t i = 0; i < group; i++) {
            int64_t at = next[(k0[i] >> (8 * b)) & 255]++;
            k1[at] = k0[i];
            o1[at] = o0[i];
        }
        uint32_t *t = k0; k0 = k1; k1 = t;
        t = o0; o0 = o1; o1 = t;
    }
    for (int64_t p = 0; p < group; p++) ranks[o0[p]] = (uint32_t)(p + 1);
}

/* An element's chance of being kept, della.py's fp32 ops in its order: ((rank - 1) / (group - 1))
 * clamped to [0, 1] (a NaN, from a row of one element, stays NaN as torch's clamp leaves it), times 2,
 * times epsilon, plus density - epsilon (`low`). Nondecreasing in the rank: every step rounds a
 * nondecreasing function. */
static inline float della_chance(int64_t rank, float span, float low, float epsilon) {
    float norm = ((float)rank - 1.0f) / span;
    norm = norm < 0.0f ? 0.0f : (norm > 1.0f ? 1.0f : norm);
    return low + norm * 2.0f * epsilon;
}

enum { RANK_BINS = 1024, BIN_SHIFT = 16, SCAN_LIMIT = 64, DIRECT_RANKS = 48 };

/* One element's rank in its row (1 for the smallest), as the stable sort gives it: the keys below its
 * own, and the equal keys before it. Two loops of comparisons that vectorise: ~group / 16 steps. */
static inline __attribute__((always_inline)) uint32_t direct_rank(const uint32_t *keys, int64_t group, int64_t i) {
    uint32_t key = keys[i], rank = 1;
    for (int64_t j = 0; j < group; j++) rank += keys[j] < key;
    for (int64_t j = 0; j < i; j++) rank += keys[j] == key;
    return rank;
}

/* DELLA's keep mask for `rows` whole rows of d = x - base, packed (element i: bit i % 8 of byte i / 8 of
 * keep): 1 where the draw uniform_at(key, i) is below the element's chance, else 0 (della.py's
 * `block_uniform(...) < chances`, to the bit). Packed, the statistic pass keeps it for the merge pass
 * (a bit an element, where recomputing it cost DELLA as much as the rest of its merge).
 *
 * The exact rank of most elements is never needed. The keys are counted into RANK_BINS bins in order
 * (each 2^BIN_SHIFT keys wide, 1/128 of an octave: the row's top 8 octaves, everything smaller in the
 * first bin), so an element's rank lies between its bin's first and last; as the chance is
 * nondecreasing in the rank, the draw lies below both ends' chances (kept) or at or above both
 * (dropped) for all but a few elements (0.05 % of a Gaussian row's; 0.03 % with 2048 bins, each half as
 * wide, whose tables cost della_keep 10 % more on 2048-element rows). Those few are ranked exactly: each
 * by comparing its key with the row's (direct_rank), or, where a row has more than DIRECT_RANKS of them (a
 * row of many equal values), by counting the smaller keys in their bin, or in a bin of more than SCAN_LIMIT
 * (the first, where everything below the top 8 octaves falls, or one of many equal values) by
 * radix-ranking that bin's members alone: ranking the whole row for it took a third of a DELLA merge. The
 * per-bin chances of each bin's lowest and highest rank are tabled once a row, so the decision of
 * every element is two lookups, a loop that vectorises (a scalar loop with the rank arithmetic was
 * half of della_keep's time, listing each bin's members another eighth). With sums, the same pass adds
 * masked_l1's two norms of the task vector (its lanes, in its order: the same sums to the bit), which
 * DELLA's statistic needs of the mask it keeps. x and base are read as stored (bfloat16 or float: code). */
static inline __attribute__((always_inline)) void della_keep_of(const void *x, const void *base, int code, int64_t rows,
                                                                int64_t group, uint64_t key, float low, float epsilon,
                                                                uint8_t *keep, double *sums) {
    uint32_t *buffer = malloc(sizeof(uint32_t) * (11 * group + 4 * (int64_t)RANK_BINS));
    /* chance[rank]: every row's; [0] and [group + 1] only for the empty bins' table entries, never read */
    float *chance = malloc(sizeof(float) * (group + 2)), *draw = malloc(sizeof(float) * group);
    uint8_t *kr = malloc((size_t)group);  /* one row's decisions (1 kept), packed into keep once made */
    float *d = malloc(sizeof(float) * group);   /* one row's task vector */
    double before[LANES] = {0}, after[LANES] = {0};  /* masked_l1's lanes: element i in lane i % LANES */
    float *lowest = malloc(sizeof(float) * 2 * RANK_BINS), *highest_chance = lowest + RANK_BINS;
    uint8_t *flag = malloc((size_t)group + 8);  /* unsure elements; gather() reads 8 past */
    if (!buffer || !chance || !draw || !kr || !d || !lowest || !flag) abort();
    memset(keep, 0, (size_t)((rows * group + 7) / 8));
    uint32_t *keys = buffer, *bin = buffer + group, *unsure = buffer + 2 * group, *members = buffer + 3 * group;
    uint32_t *scratch = buffer + 4 * group, *gathered = buffer + 8 * group, *within = buffer + 9 * group;
    uint32_t *rank_of = buffer + 10 * group;  /* the ranks of the elements of the bins radix-ranked in this row */
    uint32_t *count = buffer + 11 * group, *first = count + RANK_BINS, *fill = first + RANK_BINS, *ranked = fill + RANK_BINS;
    float span = (float)group - 1.0f;
    chance[0] = chance[group + 1] = 0.0f;
    for (int64_t rank = 1; rank <= group; rank++) chance[rank] = della_chance(rank, span, low, epsilon);
    for (int64_t r = 0; r < rows; r++) {
        int64_t row = r * group;
        for (int64_t i = 0; i < group; i++) d[i] = stored_float(x, row + i, code) - stored_float(base, row + i, code);
        uint32_t highest = 0;
        for (int64_t i = 0; i < group; i++) {
            keys[i] = rank_key(d[i]);
            highest = keys[i] > highest ? keys[i] : highest;
        }
        uint32_t bottom = highest >= ((uint32_t)RANK_BINS << BIN_SHIFT) ? highest - ((uint32_t)(RANK_BINS - 1) << BIN_SHIFT) : 0;
        memset(count, 0, sizeof(uint32_t) * RANK_BINS);
        for (int64_t i = 0; i < group; i++) {
            bin[i] = (keys[i] > bottom ? keys[i] - bottom : 0) >> BIN_SHIFT;
            draw[i] = uniform_at(key, row + i);
        }
        for (int64_t i = 0; i < group; i++) count[bin[i]]++;
        for (uint32_t b = 0, sum = 0; b < RANK_BINS; b++) {
            first[b] = sum;
            lowest[b] = chance[sum + 1];
            sum += count[b];
            highest_chance[b] = chance[sum];
        }
        /* kept below the bin's lowest rank's chance, dropped at or above its highest's, else unsure */
        for (int64_t i = 0; i < group; i++) {
            float u = draw[i];
            int keep_it = u < lowest[bin[i]], drop_it = !(u < highest_chance[bin[i]]);
            kr[i] = (uint8_t)keep_it;
            flag[i] = (uint8_t)(!keep_it & !drop_it);
        }
        int n_unsure = gather(flag, (int)group, (int *)unsure);
        if (n_unsure && n_unsure <= DIRECT_RANKS) {
            for (int k = 0; k < n_unsure; k++) {
                uint32_t i = unsure[k];
                kr[i] = draw[i] < chance[direct_rank(keys, group, i)];
            }
        } else if (n_unsure) {
            memcpy(fill, first, sizeof(uint32_t) * RANK_BINS);  /* each bin's members, in position order */
            for (int64_t i = 0; i < group; i++) members[fill[bin[i]]++] = (uint32_t)i;
            for (int k = 0; k < n_unsure; k++) ranked[bin[unsure[k]]] = 0;
            for (int k = 0; k < n_unsure; k++) {
                uint32_t i = unsure[k], b = bin[i], rank;
                if (count[b] > SCAN_LIMIT) {
                    if (!ranked[b]) {  /* members in position order: the stable sort orders equal keys by it */
                        for (uint32_t m = 0; m < count[b]; m++) gathered[m] = keys[members[first[b] + m]];
                        radix_ranks(gathered, count[b], scratch, within);
                        for (uint32_t m = 0; m < count[b]; m++) rank_of[members[first[b] + m]] = first[b] + within[m];
                        ranked[b] = 1;
                    }
                    rank = rank_of[i];
                } else {
                    rank = first[b] + 1;
                    for (uint32_t m = first[b]; m < first[b] + count[b]; m++)
                        rank += keys[members[m]] < keys[i] || (keys[members[m]] == keys[i] && members[m] < i);
                }
                kr[i] = draw[i] < chance[rank];
            }
        }
        pack_bits(kr, row, group, keep);
        if (sums && (group & (LANES - 1)) == 0)  /* every row starts at lane 0: the loop vectorises */
            for (int64_t i = 0; i < group; i += LANES)
                for (int w = 0; w < LANES; w++) before[w] += fabsf(d[i + w]), after[w] += fabsf(d[i + w] * (float)kr[i + w]);
        else if (sums)
            for (int64_t i = 0; i < group; i++)
                before[(row + i) & (LANES - 1)] += fabsf(d[i]), after[(row + i) & (LANES - 1)] += fabsf(d[i] * (float)kr[i]);
    }
    if (sums) {
        sums[0] = 0.0, sums[1] = 0.0;
        for (int w = 0; w < LANES; w++) sums[0] += before[w], sums[1] += after[w];
    }
    free(buffer);
    free(chance);
    free(draw);
    free(kr);
    free(d);
    free(lowest);
    free(flag);
}

MULTIVERSION
void della_keep(const void *x, const void *base, int code, int64_t rows, int64_t group, uint64_t key, float low,
                float epsilon, uint8_t *keep, double *sums) {
    if (code == BF16)
        della_keep_of(x, base, BF16, rows, group, key, low, epsilon, keep, sums);
    else
        della_keep_of(x, base, F32, rows, group, key, low, epsilon, keep, sums);
}
