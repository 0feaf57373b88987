/* C11 atomics for mtserve's C core, as small inline functions Cython can declare.
 *
 * Why C11 <stdatomic.h> rather than GCC's __atomic builtins: the fields are declared
 * _Atomic, so the compiler itself guarantees that every access to them is atomic (a
 * stray plain access in Cython code would still be an atomic, sequentially consistent
 * one, never a torn or reordered one), and the code is standard C that GCC, Clang and
 * MSVC (17.5+) compile alike. Each function names its memory order, so the .pyx reads as
 * the ordering argument it implements.
 */
#ifndef MTSERVE_ATOMICS_H
#define MTSERVE_ATOMICS_H

#if defined(__STDC_NO_ATOMICS__)
#error "mtserve's C core needs C11 atomics (<stdatomic.h>)"
#endif

#include <stdatomic.h>
#include <stdint.h>

#if ATOMIC_LLONG_LOCK_FREE != 2
#error "mtserve's C core needs lock-free 64-bit atomics"
#endif

typedef _Atomic uint64_t mt_atomic_u64;  /* a slot's state word, a word of a bitmap */
typedef _Atomic int64_t mt_atomic_i64;   /* a counter */
typedef _Atomic double mt_atomic_double; /* a time read by threads that do not own it */

static inline void mt_init_u64(mt_atomic_u64 *p, uint64_t v) { atomic_init(p, v); }
static inline void mt_init_i64(mt_atomic_i64 *p, int64_t v) { atomic_init(p, v); }
static inline void mt_init_double(mt_atomic_double *p, double v) { atomic_init(p, v); }

static inline uint64_t mt_load_acquire(mt_atomic_u64 *p) {
    return atomic_load_explicit(p, memory_order_acquire);
}
static inline void mt_store_release(mt_atomic_u64 *p, uint64_t v) {
    atomic_store_explicit(p, v, memory_order_release);
}
static inline uint64_t mt_exchange_acq_rel(mt_atomic_u64 *p, uint64_t v) {
    return atomic_exchange_explicit(p, v, memory_order_acq_rel);
}
/* *expected is updated to the current value when the swap fails. */
static inline int mt_cas_acquire(mt_atomic_u64 *p, uint64_t *expected, uint64_t desired) {
    return atomic_compare_exchange_strong_explicit(
        p, expected, desired, memory_order_acquire, memory_order_acquire);
}
static inline int mt_cas_release(mt_atomic_u64 *p, uint64_t *expected, uint64_t desired) {
    return atomic_compare_exchange_strong_explicit(
        p, expected, desired, memory_order_release, memory_order_relaxed);
}

static inline int64_t mt_load_acquire_i64(mt_atomic_i64 *p) {
    return atomic_load_explicit(p, memory_order_acquire);
}
static inline void mt_store_release_i64(mt_atomic_i64 *p, int64_t v) {
    atomic_store_explicit(p, v, memory_order_release);
}
/* Adds v (may be negative) and returns the value before; one read-modify-write, so it
 * reads the latest value in the counter's modification order. */
static inline int64_t mt_fetch_add_i64(mt_atomic_i64 *p, int64_t v) {
    return atomic_fetch_add_explicit(p, v, memory_order_acq_rel);
}

static inline double mt_load_relaxed_double(mt_atomic_double *p) {
    return atomic_load_explicit(p, memory_order_relaxed);
}
static inline void mt_store_relaxed_double(mt_atomic_double *p, double v) {
    atomic_store_explicit(p, v, memory_order_relaxed);
}
static inline void mt_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }

/* 1 if the atomic types above are lock-free here (checked once at import). */
static inline int mt_atomics_lock_free(void) {
    mt_atomic_u64 u;
    mt_atomic_i64 i;
    mt_atomic_double d;
    atomic_init(&u, 0);
    atomic_init(&i, 0);
    atomic_init(&d, 0.0);
    return atomic_is_lock_free(&u) && atomic_is_lock_free(&i) && atomic_is_lock_free(&d);
}

/* Not atomics: bit helpers for scanning a bitmap word x (not 0 for ctz and msb). */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static inline int mt_ctz64(uint64_t x) { /* the index of the lowest set bit */
    unsigned long i;
    _BitScanForward64(&i, x);
    return (int)i;
}
static inline int mt_msb64(uint64_t x) { /* the index of the highest set bit */
    unsigned long i;
    _BitScanReverse64(&i, x);
    return (int)i;
}
#else
static inline int mt_ctz64(uint64_t x) { return __builtin_ctzll(x); }
static inline int mt_msb64(uint64_t x) { return 63 - __builtin_clzll(x); }
#endif
/* The number of set bits; portable (compilers turn it into popcnt where they may). */
static inline int mt_popcount64(uint64_t x) {
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
}

#endif /* MTSERVE_ATOMICS_H */
