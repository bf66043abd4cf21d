/* Byte-order helpers for the compiled core.
 *
 * Every multi-byte field of a broker frame or of a PostgreSQL binary COPY
 * payload goes through one of these: memcpy into a local (no unaligned or
 * type-punned pointer casts) and a byte swap where the host order differs.
 * Compilers turn each into a single load/store + bswap.
 */
#ifndef INGESTOR_ENDIAN_H
#define INGESTOR_ENDIAN_H

#include <stdint.h>
#include <string.h>

#ifndef INGESTOR_DEBUG
#define INGESTOR_DEBUG 0
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define ING_BE16(x) (x)
#define ING_BE32(x) (x)
#define ING_BE64(x) (x)
#define ING_LE16(x) __builtin_bswap16(x)
#define ING_LE32(x) __builtin_bswap32(x)
#define ING_LE64(x) __builtin_bswap64(x)
#else
#define ING_BE16(x) __builtin_bswap16(x)
#define ING_BE32(x) __builtin_bswap32(x)
#define ING_BE64(x) __builtin_bswap64(x)
#define ING_LE16(x) (x)
#define ING_LE32(x) (x)
#define ING_LE64(x) (x)
#endif

static inline uint16_t ing_load_u16be(const unsigned char *p) {
    uint16_t v; memcpy(&v, p, 2); return ING_BE16(v);
}
static inline uint32_t ing_load_u32be(const unsigned char *p) {
    uint32_t v; memcpy(&v, p, 4); return ING_BE32(v);
}
static inline uint32_t ing_load_u32le(const unsigned char *p) {
    uint32_t v; memcpy(&v, p, 4); return ING_LE32(v);
}
static inline uint64_t ing_load_u64le(const unsigned char *p) {
    uint64_t v; memcpy(&v, p, 8); return ING_LE64(v);
}
static inline uint16_t ing_load_u16le(const unsigned char *p) {
    uint16_t v; memcpy(&v, p, 2); return ING_LE16(v);
}
static inline uint64_t ing_load_u64be(const unsigned char *p) {
    uint64_t v; memcpy(&v, p, 8); return ING_BE64(v);
}
static inline void ing_store_u16be(unsigned char *p, uint16_t v) {
    v = ING_BE16(v); memcpy(p, &v, 2);
}
static inline void ing_store_u32be(unsigned char *p, uint32_t v) {
    v = ING_BE32(v); memcpy(p, &v, 4);
}
static inline void ing_store_u64be(unsigned char *p, uint64_t v) {
    v = ING_BE64(v); memcpy(p, &v, 8);
}
/* Signed stores for the COPY writer: two's complement bits, big-endian. */
static inline void ing_store_i16be(unsigned char *p, int16_t v) {
    ing_store_u16be(p, (uint16_t)v);
}
static inline void ing_store_i32be(unsigned char *p, int32_t v) {
    ing_store_u32be(p, (uint32_t)v);
}
static inline void ing_store_i64be(unsigned char *p, int64_t v) {
    ing_store_u64be(p, (uint64_t)v);
}

#endif
