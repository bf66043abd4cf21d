/* 128-bit arithmetic for the candle VWAP.
 *
 * sum(price_raw * volume increase) overflows 64 bits on real data (a uint32
 * price times a day's volume), so the engine accumulates it as a hi/lo pair
 * of uint64 and divides here with the compiler's unsigned __int128.  Never
 * floats: the result must equal PostgreSQL's exact numeric arithmetic.
 */
#ifndef INGESTOR_WIDE_H
#define INGESTOR_WIDE_H

#include <stdint.h>

#ifndef __SIZEOF_INT128__
#error "ingestor's core needs a compiler with unsigned __int128 (GCC or Clang on a 64-bit target)"
#endif

/* round(pv * scale / volume) half away from zero (all terms are >= 0, so
 * half up), where pv = hi * 2^64 + lo.  With pv < 2^96 and scale <= 10^5
 * (10^7 / divisor) the product stays below 2^113; volume > 0. */
static inline int64_t ing_vwap_e7(uint64_t hi, uint64_t lo, uint64_t volume, uint64_t scale) {
    unsigned __int128 num = (((unsigned __int128)hi << 64) | lo) * scale;
    unsigned __int128 q = num / volume;
    unsigned __int128 r = num - q * volume;
    if (r >= volume - r)   /* 2r >= volume, without overflow */
        q += 1;
    return (int64_t)q;
}

#endif
