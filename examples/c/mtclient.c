/*
 * mtclient.c - a single-file C99 client for the mtserve tenant protocol (MTS1).
 *
 * Everything it speaks is in docs/PROTOCOL.md; the section numbers below refer to it.
 * Its only dependency is libzmq: the msgpack encoder/decoder and SHA-256 are in this
 * file (only what the protocol needs, every decoded length bounds-checked).
 *
 *   cc -O2 -std=c99 -Wall -Wextra -o build/mtclient examples/c/mtclient.c \
 *      $(pkg-config --cflags --libs libzmq)
 *
 *   mtclient ADDRESS ping
 *   mtclient ADDRESS [--tenant T] list
 *   mtclient ADDRESS [--tenant T] upload NAME FILE.onnx [--replace] [--max-batch B]
 *   mtclient ADDRESS [--tenant T] infer MODEL D0,D1,... V [--deadline-ms MS] [--input NAME]
 *   mtclient ADDRESS [--tenant T] load MODEL D0,D1,... N WINDOW [--deadline-ms MS] [--input NAME]
 *   (every command also takes --timeout SECONDS, the limit on each wait; default 30)
 *   mtclient ADDRESS|- --key FILE.key_secret COMMAND ...
 *   (CURVE with an mtserve key file; ADDRESS '-' = the file's endpoint; a secure broker
 *   takes the tenant from the key and ignores --tenant)
 *
 * Exit status: 0 success; 2 the broker answered with a non-zero status (printed as
 * "error: [status 30 MODEL_NOT_FOUND] message"); 1 usage, transport or protocol error.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define TAG "MTS1"
enum { CMD_PING = 1, CMD_UPLOAD_BEGIN, CMD_UPLOAD_CHUNK, CMD_UPLOAD_COMMIT, CMD_INFER,
       CMD_LIST, CMD_INFO, CMD_DELETE, CMD_STATUS };

#define CHUNK_BYTES (1u << 20)       /* upload chunk size (section 7.3 allows up to 64 MiB) */
#define MAX_RANK 8                   /* section 5 */
#define MAX_DIM (UINT64_C(1) << 40)  /* section 5: 0 <= d < 2^40 */
#define MAX_REPLY_FRAMES 65536       /* a bound of our own on what we accept */
#define ZEROCOPY_BYTES (64u * 1024)  /* payload frames at least this big are not copied */
#define MAX_JSON_DEPTH 32

/* ================================================================ errors */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static const char *status_name(int64_t status)
{
    switch (status) {
    case 0: return "OK";
    case 10: return "MALFORMED";
    case 11: return "UNSUPPORTED_VERSION";
    case 12: return "UNKNOWN_COMMAND";
    case 13: return "TOO_LARGE";
    case 14: return "BAD_ARGUMENT";
    case 20: return "UNAUTHENTICATED";
    case 21: return "FORBIDDEN";
    case 22: return "QUOTA_EXCEEDED";
    case 23: return "RATE_LIMITED";
    case 30: return "MODEL_NOT_FOUND";
    case 31: return "MODEL_INVALID";
    case 32: return "MODEL_EXISTS";
    case 33: return "UPLOAD_CORRUPT";
    case 40: return "INPUT_INVALID";
    case 50: return "DEADLINE_UNMEETABLE";
    case 51: return "DEADLINE_EXPIRED";
    case 52: return "OVERLOADED";
    case 60: return "WORKER_LOST";
    case 61: return "EXEC_FAILED";
    case 62: return "LOAD_FAILED";
    case 90: return "INTERNAL";
    case 91: return "SHUTTING_DOWN";
    default: return "UNKNOWN"; /* section 10: any unknown non-zero code is an error */
    }
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ================================================================ msgpack encoder */

typedef struct {
    uint8_t *data;
    size_t len, cap;
} buf_t;

static void buf_put(buf_t *b, const void *p, size_t n)
{
    if (n > SIZE_MAX / 2 - b->len)
        die("buffer too large");
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d)
            die("out of memory");
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void buf_byte(buf_t *b, uint8_t x) { buf_put(b, &x, 1); }

static void buf_be(buf_t *b, uint64_t v, int bytes) /* big-endian, as msgpack wants */
{
    uint8_t tmp[8];
    for (int i = 0; i < bytes; i++)
        tmp[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    buf_put(b, tmp, (size_t)bytes);
}

static void mp_put_map(buf_t *b, uint32_t n)
{
    if (n < 16) buf_byte(b, (uint8_t)(0x80 | n));
    else if (n <= 0xffff) { buf_byte(b, 0xde); buf_be(b, n, 2); }
    else { buf_byte(b, 0xdf); buf_be(b, n, 4); }
}

static void mp_put_array(buf_t *b, uint32_t n)
{
    if (n < 16) buf_byte(b, (uint8_t)(0x90 | n));
    else if (n <= 0xffff) { buf_byte(b, 0xdc); buf_be(b, n, 2); }
    else { buf_byte(b, 0xdd); buf_be(b, n, 4); }
}

/* Keys and text values are always str (a0-bf, d9, da, db), never bin: section 3. */
static void mp_put_str(buf_t *b, const char *s, size_t n)
{
    if (n < 32) buf_byte(b, (uint8_t)(0xa0 | n));
    else if (n <= 0xff) { buf_byte(b, 0xd9); buf_be(b, n, 1); }
    else if (n <= 0xffff) { buf_byte(b, 0xda); buf_be(b, n, 2); }
    else if (n <= 0xffffffffu) { buf_byte(b, 0xdb); buf_be(b, n, 4); }
    else die("string too long");
    buf_put(b, s, n);
}

static void mp_put_cstr(buf_t *b, const char *s) { mp_put_str(b, s, strlen(s)); }

static void mp_put_uint(buf_t *b, uint64_t v) /* the smallest format that fits */
{
    if (v < 128) buf_byte(b, (uint8_t)v);
    else if (v <= 0xff) { buf_byte(b, 0xcc); buf_be(b, v, 1); }
    else if (v <= 0xffff) { buf_byte(b, 0xcd); buf_be(b, v, 2); }
    else if (v <= 0xffffffffu) { buf_byte(b, 0xce); buf_be(b, v, 4); }
    else { buf_byte(b, 0xcf); buf_be(b, v, 8); }
}

static void mp_put_uint32_fixed(buf_t *b, uint32_t v) /* always ce + 4 bytes */
{
    buf_byte(b, 0xce);
    buf_be(b, v, 4);
}

static void mp_put_double(buf_t *b, double d)
{
    uint64_t bits;
    memcpy(&bits, &d, sizeof bits);
    buf_byte(b, 0xcb);
    buf_be(b, bits, 8);
}

static void mp_put_bool(buf_t *b, bool v) { buf_byte(b, v ? 0xc3 : 0xc2); }

/* ================================================================ msgpack decoder */

/* A reader over a byte range; every read checks it stays inside [p, end). */
typedef struct {
    const uint8_t *p, *end;
} mp_in;

typedef enum { MP_NIL, MP_BOOL, MP_UINT, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY,
               MP_MAP, MP_EXT } mp_type;

typedef struct {
    mp_type type;
    bool b;          /* MP_BOOL */
    uint64_t u;      /* MP_UINT: any non-negative integer */
    int64_t i;       /* MP_INT: a negative integer */
    double f;        /* MP_FLOAT (float32 widened) */
    const char *s;   /* MP_STR, MP_BIN, MP_EXT: the bytes (not NUL-terminated) */
    uint32_t n;      /* MP_STR/BIN/EXT: length; MP_ARRAY: items; MP_MAP: pairs */
} mp_val;

static uint64_t get_be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | p[i];
    return v;
}

static bool mp_take(mp_in *in, size_t n, const uint8_t **out)
{
    if ((size_t)(in->end - in->p) < n)
        return false;
    *out = in->p;
    in->p += n;
    return true;
}

/* Read one value's head. Scalars, str, bin and ext are consumed whole; for an array or
 * a map only its count is read, and the reader stops at its first element. */
static bool mp_read(mp_in *in, mp_val *v)
{
    const uint8_t *q;
    if (!mp_take(in, 1, &q))
        return false;
    uint8_t c = q[0];
    int w = 0; /* width of a following length/value field */
    memset(v, 0, sizeof *v);
    if (c <= 0x7f) { v->type = MP_UINT; v->u = c; return true; }
    if (c >= 0xe0) { v->type = MP_INT; v->i = (int8_t)c; return true; }
    if ((c & 0xf0) == 0x80) { v->type = MP_MAP; v->n = c & 0x0f; goto container; }
    if ((c & 0xf0) == 0x90) { v->type = MP_ARRAY; v->n = c & 0x0f; goto container; }
    if ((c & 0xe0) == 0xa0) { v->type = MP_STR; v->n = c & 0x1f; goto body; }
    switch (c) {
    case 0xc0: v->type = MP_NIL; return true;
    case 0xc2: case 0xc3: v->type = MP_BOOL; v->b = c == 0xc3; return true;
    case 0xc4: case 0xc5: case 0xc6:
        v->type = MP_BIN; w = 1 << (c - 0xc4); break;
    case 0xd9: case 0xda: case 0xdb:
        v->type = MP_STR; w = 1 << (c - 0xd9); break;
    case 0xc7: case 0xc8: case 0xc9:
        v->type = MP_EXT; w = 1 << (c - 0xc7); break;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16 + type byte */
        v->type = MP_EXT; v->n = 1u << (c - 0xd4);
        if (!mp_take(in, 1, &q)) return false;
        goto body;
    case 0xca: {
        float f32;
        uint32_t bits;
        if (!mp_take(in, 4, &q)) return false;
        bits = (uint32_t)get_be(q, 4);
        memcpy(&f32, &bits, 4);
        v->type = MP_FLOAT; v->f = f32;
        return true;
    }
    case 0xcb: {
        uint64_t bits;
        if (!mp_take(in, 8, &q)) return false;
        bits = get_be(q, 8);
        memcpy(&v->f, &bits, 8);
        v->type = MP_FLOAT;
        return true;
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        w = 1 << (c - 0xcc);
        if (!mp_take(in, (size_t)w, &q)) return false;
        v->type = MP_UINT; v->u = get_be(q, w);
        return true;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        w = 1 << (c - 0xd0);
        if (!mp_take(in, (size_t)w, &q)) return false;
        uint64_t raw = get_be(q, w);
        int64_t x;
        if (w == 8) memcpy(&x, &raw, 8);                       /* two's complement */
        else if (raw >> (8 * w - 1)) x = (int64_t)raw - ((int64_t)1 << (8 * w));
        else x = (int64_t)raw;
        if (x >= 0) { v->type = MP_UINT; v->u = (uint64_t)x; }
        else { v->type = MP_INT; v->i = x; }
        return true;
    }
    case 0xdc: case 0xdd:
        v->type = MP_ARRAY; w = c == 0xdc ? 2 : 4;
        if (!mp_take(in, (size_t)w, &q)) return false;
        v->n = (uint32_t)get_be(q, w);
        goto container;
    case 0xde: case 0xdf:
        v->type = MP_MAP; w = c == 0xde ? 2 : 4;
        if (!mp_take(in, (size_t)w, &q)) return false;
        v->n = (uint32_t)get_be(q, w);
        goto container;
    default: /* 0xc1 is never used */
        return false;
    }
    /* str, bin, ext with an explicit length field */
    if (!mp_take(in, (size_t)w, &q)) return false;
    v->n = (uint32_t)get_be(q, w);
    if (v->type == MP_EXT && !mp_take(in, 1, &q)) return false; /* ext type byte */
body:
    if (!mp_take(in, v->n, &q)) return false;
    v->s = (const char *)q;
    return true;
container:
    /* Every element takes at least one byte: a count beyond what is left is a lie. */
    if ((uint64_t)v->n * (v->type == MP_MAP ? 2u : 1u) > (uint64_t)(in->end - in->p))
        return false;
    return true;
}

/* Skip the elements of an array or map whose head `v` was just read (no recursion, so
 * no depth limit is needed: a count of values still to skip is enough). */
static bool mp_skip_items(mp_in *in, const mp_val *v)
{
    uint64_t pending = v->type == MP_ARRAY ? v->n : v->type == MP_MAP ? 2 * (uint64_t)v->n : 0;
    while (pending) {
        mp_val x;
        if (!mp_read(in, &x))
            return false;
        pending--;
        if (x.type == MP_ARRAY) pending += x.n;
        else if (x.type == MP_MAP) pending += 2 * (uint64_t)x.n;
    }
    return true;
}

/* Skip one complete value. */
static bool mp_skip(mp_in *in)
{
    mp_val v;
    return mp_read(in, &v) && mp_skip_items(in, &v);
}

static bool mp_is_key(const mp_val *k, const char *key)
{
    size_t n = strlen(key);
    return k->type == MP_STR && k->n == n && memcmp(k->s, key, n) == 0;
}

/* Find `key` in the map that `map` starts at; on success `*value` reads its value. */
static bool mp_find(mp_in map, const char *key, mp_in *value)
{
    mp_val v;
    if (!mp_read(&map, &v) || v.type != MP_MAP)
        die("malformed reply: expected a msgpack map");
    for (uint32_t i = 0; i < v.n; i++) {
        mp_val k;
        if (!mp_read(&map, &k) || !mp_skip_items(&map, &k)) /* a non-str key is skipped */
            die("malformed reply: truncated map");
        if (mp_is_key(&k, key)) {
            *value = map;
            return true;
        }
        if (!mp_skip(&map))
            die("malformed reply: truncated map value");
    }
    return false;
}

/* Typed accessors: die with a clear message when a reply field has the wrong type. */
static bool get_str(mp_in map, const char *key, const char **s, uint32_t *n)
{
    mp_in in;
    mp_val v;
    if (!mp_find(map, key, &in))
        return false;
    if (!mp_read(&in, &v) || v.type != MP_STR)
        die("malformed reply: '%s' is not a string", key);
    *s = v.s;
    *n = v.n;
    return true;
}

static bool val_to_i64(const mp_val *v, int64_t *out)
{
    if (v->type == MP_INT) { *out = v->i; return true; }
    if (v->type == MP_UINT && v->u <= INT64_MAX) { *out = (int64_t)v->u; return true; }
    return false;
}

static bool get_int(mp_in map, const char *key, int64_t *out)
{
    mp_in in;
    mp_val v;
    if (!mp_find(map, key, &in))
        return false;
    if (!mp_read(&in, &v) || !val_to_i64(&v, out))
        die("malformed reply: '%s' is not an integer", key);
    return true;
}

/* A reader positioned on field `key` (which must exist). */
static mp_in need_field(mp_in map, const char *key)
{
    mp_in in;
    if (!mp_find(map, key, &in))
        die("malformed reply: field '%s' is missing", key);
    return in;
}

/* Print any value as JSON (str keys as they come; nested depth bounded). */
static void json_string(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void print_json(mp_in *in, int depth)
{
    mp_val v;
    if (depth > MAX_JSON_DEPTH || !mp_read(in, &v))
        die("malformed reply: bad or too deeply nested msgpack");
    switch (v.type) {
    case MP_NIL: printf("null"); break;
    case MP_BOOL: printf(v.b ? "true" : "false"); break;
    case MP_UINT: printf("%" PRIu64, v.u); break;
    case MP_INT: printf("%" PRId64, v.i); break;
    case MP_FLOAT:
        if (!isfinite(v.f)) {
            printf("null"); /* NaN, inf: not JSON */
        } else {
            char text[40];
            for (int prec = 15; prec <= 17; prec++) { /* the shortest text that reads back */
                snprintf(text, sizeof text, "%.*g", prec, v.f);
                if (strtod(text, NULL) == v.f)
                    break;
            }
            printf("%s", text);
        }
        break;
    case MP_STR: json_string(v.s, v.n); break;
    case MP_BIN: printf("\"<%" PRIu32 " bytes>\"", v.n); break;
    case MP_EXT: printf("\"<ext>\""); break;
    case MP_ARRAY:
        putchar('[');
        for (uint32_t i = 0; i < v.n; i++) {
            if (i) printf(", ");
            print_json(in, depth + 1);
        }
        putchar(']');
        break;
    case MP_MAP:
        putchar('{');
        for (uint32_t i = 0; i < v.n; i++) {
            if (i) printf(", ");
            print_json(in, depth + 1); /* the key (a str by the protocol's rules) */
            printf(": ");
            print_json(in, depth + 1);
        }
        putchar('}');
        break;
    }
}

/* ================================================================ SHA-256 (FIPS 180-4) */

typedef struct {
    uint32_t h[8];
    uint64_t total; /* bytes hashed so far */
    uint8_t block[64];
    size_t used;    /* bytes waiting in block */
} sha256_t;

static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256_t *c, const uint8_t *p)
{
    uint32_t w[64], a, b, d, e, f, g, h, cc;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)get_be(p + 4 * i, 4);
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3];
    e = c->h[4]; f = c->h[5]; g = c->h[6]; h = c->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & cc) ^ (b & cc));
        h = g; g = f; f = e; e = d + t1;
        d = cc; cc = b; b = a; a = t1 + t2;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d;
    c->h[4] += e; c->h[5] += f; c->h[6] += g; c->h[7] += h;
}

static void sha256_init(sha256_t *c)
{
    static const uint32_t h0[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                    0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
    memcpy(c->h, h0, sizeof h0);
    c->total = 0;
    c->used = 0;
}

static void sha256_update(sha256_t *c, const uint8_t *p, size_t n)
{
    c->total += n;
    while (n) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used == 64) {
            sha256_block(c, c->block);
            c->used = 0;
        }
    }
}

static void sha256_hex(sha256_t *c, char out[65])
{
    uint64_t bits = c->total * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    sha256_update(c, &pad, 1);
    while (c->used != 56)
        sha256_update(c, &zero, 1);
    for (int i = 0; i < 8; i++)
        len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(c, len, 8);
    for (int i = 0; i < 8; i++)
        snprintf(out + 8 * i, 9, "%08" PRIx32, c->h[i]);
}

/* ================================================================ frames (section 2) */

typedef struct {
    void *ctx, *sock;
    const char *address;
    const char *tenant; /* NULL: the field is omitted (the broker uses "default") */
    const char *key_path; /* --key FILE: CURVE with that identity; NULL: plain */
    uint64_t next_id;
    long timeout_ms;
} client_t;

/* No reply within the timeout. With CURVE a refused handshake is silent (libzmq drops
 * the connection and retries), so this is also what a wrong key looks like. */
static void die_no_reply(const client_t *c, const char *detail)
{
    if (c->key_path)
        die("no reply from %s within %.1f s%s; with --key %s, the key may be wrong, revoked "
            "or for another broker (a refused CURVE handshake gets no answer)",
            c->address, (double)c->timeout_ms / 1000.0, detail, c->key_path);
    die("no reply from %s within %.1f s%s", c->address, (double)c->timeout_ms / 1000.0, detail);
}

typedef struct {
    zmq_msg_t *frames; /* the whole message, starting at the empty delimiter */
    size_t n, cap;
    uint8_t cmd;
    mp_in header;      /* frame 3 */
    int64_t status;
    bool has_id;
    uint64_t id;
} reply_t;

static void send_frame(void *sock, const void *data, size_t len, bool more)
{
    int flags = more ? ZMQ_SNDMORE : 0;
    if (len >= ZEROCOPY_BYTES) {
        /* Large payloads go without a copy; the caller keeps `data` alive until the
         * reply arrives (by then libzmq has written it). A NULL free function = ours. */
        zmq_msg_t m;
        if (zmq_msg_init_data(&m, (void *)data, len, NULL, NULL) != 0)
            die("zmq_msg_init_data: %s", zmq_strerror(errno));
        while (zmq_msg_send(&m, sock, flags) < 0)
            if (errno != EINTR)
                die("zmq_msg_send: %s", zmq_strerror(errno));
        return;
    }
    while (zmq_send(sock, data, len, flags) < 0)
        if (errno != EINTR)
            die("zmq_send: %s", zmq_strerror(errno));
}

/* [empty][MTS1][cmd][header][payload...]: a DEALER sends the delimiter itself. */
static void send_request(client_t *c, uint8_t cmd, const buf_t *hdr, const void *const *payload,
                         const size_t *sizes, size_t npayload)
{
    send_frame(c->sock, "", 0, true);
    send_frame(c->sock, TAG, 4, true);
    send_frame(c->sock, &cmd, 1, true);
    send_frame(c->sock, hdr->data, hdr->len, npayload > 0);
    for (size_t i = 0; i < npayload; i++)
        send_frame(c->sock, payload[i], sizes[i], i + 1 < npayload);
}

/* Wait until a message can be read; false on timeout. */
static bool wait_readable(void *sock, long timeout_ms)
{
    double deadline = now_s() + (double)timeout_ms / 1000.0;
    for (;;) {
        zmq_pollitem_t item = { sock, 0, ZMQ_POLLIN, 0 };
        long left = (long)((deadline - now_s()) * 1000.0);
        int rc = zmq_poll(&item, 1, left > 0 ? left : 0);
        if (rc > 0)
            return true;
        if (rc == 0 && left <= 0)
            return false;
        if (rc < 0 && errno != EINTR)
            die("zmq_poll: %s", zmq_strerror(errno));
    }
}

static void reply_free(reply_t *r)
{
    for (size_t i = 0; i < r->n; i++)
        zmq_msg_close(&r->frames[i]);
    r->n = 0;
}

static void reply_destroy(reply_t *r)
{
    reply_free(r);
    free(r->frames);
    r->frames = NULL;
    r->cap = 0;
}

/* Check the frames of a reply and read its status and id (sections 2, 4, 9). */
static void parse_reply(reply_t *r)
{
    if (r->n < 4)
        die("malformed reply: %zu frames, expected at least 4", r->n);
    if (zmq_msg_size(&r->frames[0]) != 0)
        die("malformed reply: the first frame is not the empty delimiter");
    if (zmq_msg_size(&r->frames[1]) != 4 || memcmp(zmq_msg_data(&r->frames[1]), TAG, 4) != 0)
        die("malformed reply: the tag frame is not MTS1");
    if (zmq_msg_size(&r->frames[2]) != 1)
        die("malformed reply: the command frame is not 1 byte");
    r->cmd = *(const uint8_t *)zmq_msg_data(&r->frames[2]);
    const uint8_t *h = zmq_msg_data(&r->frames[3]);
    r->header.p = h;
    r->header.end = h + zmq_msg_size(&r->frames[3]);
    mp_in check = r->header;
    mp_val v;
    mp_in peek = r->header;
    if (!mp_read(&peek, &v) || v.type != MP_MAP || !mp_skip(&check) || check.p != check.end)
        die("malformed reply: the header is not exactly one msgpack map");
    if (!get_int(r->header, "status", &r->status))
        die("malformed reply: no 'status' field");
    mp_in in;
    r->has_id = mp_find(r->header, "id", &in);
    if (r->has_id && (!mp_read(&in, &v) || v.type != MP_UINT))
        die("malformed reply: 'id' is not an unsigned integer");
    r->id = r->has_id ? v.u : 0;
}

/* Receive one whole multipart message (all its frames are there once POLLIN is). */
static void recv_reply(client_t *c, reply_t *r)
{
    if (!wait_readable(c->sock, c->timeout_ms))
        die_no_reply(c, "");
    reply_free(r);
    int more = 1;
    while (more) {
        if (r->n == r->cap) {
            if (r->cap >= MAX_REPLY_FRAMES)
                die("malformed reply: more than %d frames", MAX_REPLY_FRAMES);
            r->cap = r->cap ? 2 * r->cap : 8;
            r->frames = realloc(r->frames, r->cap * sizeof *r->frames);
            if (!r->frames)
                die("out of memory");
        }
        zmq_msg_t *m = &r->frames[r->n];
        zmq_msg_init(m);
        while (zmq_msg_recv(m, c->sock, 0) < 0)
            if (errno != EINTR)
                die("zmq_msg_recv: %s", zmq_strerror(errno));
        r->n++;
        more = zmq_msg_more(m);
    }
    parse_reply(r);
}

static void fail_status(const reply_t *r) /* exit 2 with the broker's message */
{
    const char *msg = "";
    uint32_t n = 0;
    get_str(r->header, "error", &msg, &n);
    fprintf(stderr, "error: [status %" PRId64 " %s] %.*s\n", r->status, status_name(r->status),
            (int)n, msg);
    exit(2);
}

/* Start a request header: the map, `id` and (if set) `tenant`; then `nfields` follow. */
static uint64_t header_begin(client_t *c, buf_t *b, uint32_t nfields)
{
    uint64_t id = c->next_id++;
    b->len = 0;
    mp_put_map(b, nfields + 1 + (c->tenant ? 1 : 0));
    mp_put_cstr(b, "id");
    mp_put_uint(b, id);
    if (c->tenant) {
        mp_put_cstr(b, "tenant");
        mp_put_cstr(b, c->tenant);
    }
    return id;
}

/* Send a request and wait for its reply; a non-zero status ends the program (exit 2).
 * Replies with another id are stale (an earlier request we gave up on) and skipped; an
 * id-less reply is an error about this request (section 4: there is only one in flight). */
static void call(client_t *c, uint8_t cmd, const buf_t *hdr, uint64_t id,
                 const void *const *payload, const size_t *sizes, size_t npayload, reply_t *r)
{
    send_request(c, cmd, hdr, payload, sizes, npayload);
    do
        recv_reply(c, r);
    while (r->has_id && r->id != id);
    if (r->status != 0)
        fail_status(r);
    if (r->cmd != cmd)
        die("malformed reply: command byte %u, expected %u", r->cmd, cmd);
}

/* ================================================================ tensors (section 6) */

typedef struct {
    const char *name;
    uint32_t name_len;
    char dtype[16];
    int rank;
    int64_t dims[MAX_RANK];
} desc_t;

static size_t dtype_size(const char *dtype)
{
    static const struct { const char *name; size_t size; } table[] = {
        { "bool", 1 }, { "uint8", 1 }, { "int8", 1 }, { "int16", 2 }, { "int32", 4 },
        { "int64", 8 }, { "float16", 2 }, { "float32", 4 }, { "float64", 8 },
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (strcmp(dtype, table[i].name) == 0)
            return table[i].size;
    return 0;
}

/* Read `[name, dtype, shape]`; -1 dims are allowed (model signatures). */
static void read_desc(mp_in *in, desc_t *d)
{
    mp_val v;
    if (!mp_read(in, &v) || v.type != MP_ARRAY || v.n != 3)
        die("malformed reply: a tensor description is not a 3-element array");
    if (!mp_read(in, &v) || v.type != MP_STR || v.n == 0)
        die("malformed reply: a tensor name is not a non-empty string");
    d->name = v.s;
    d->name_len = v.n;
    if (!mp_read(in, &v) || v.type != MP_STR || v.n >= sizeof d->dtype)
        die("malformed reply: bad tensor dtype");
    memcpy(d->dtype, v.s, v.n);
    d->dtype[v.n] = '\0';
    if (!mp_read(in, &v) || v.type != MP_ARRAY || v.n > MAX_RANK)
        die("malformed reply: a tensor shape is not an array of at most %d ints", MAX_RANK);
    d->rank = (int)v.n;
    for (int i = 0; i < d->rank; i++) {
        mp_val dim;
        if (!mp_read(in, &dim) || !val_to_i64(&dim, &d->dims[i]) || d->dims[i] < -1 ||
            d->dims[i] >= (int64_t)MAX_DIM)
            die("malformed reply: bad dimension in tensor '%.*s'", (int)d->name_len, d->name);
    }
}

static void print_shape(const desc_t *d)
{
    putchar('[');
    for (int i = 0; i < d->rank; i++)
        printf(i ? ",%" PRId64 : "%" PRId64, d->dims[i]);
    putchar(']');
}

static double half_to_double(uint16_t h)
{
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double v;
    if (exp == 0) v = mant * (1.0 / (1 << 24));                 /* subnormal */
    else if (exp == 31) v = mant ? NAN : INFINITY;
    else v = ldexp(1.0 + mant / 1024.0, exp - 15);
    return (h & 0x8000) ? -v : v;
}

/* Print element i of a little-endian tensor buffer. */
static void print_element(const char *dtype, const uint8_t *p)
{
    uint64_t raw = 0;
    size_t size = dtype_size(dtype);
    for (size_t i = 0; i < size; i++)
        raw |= (uint64_t)p[i] << (8 * i);
    if (!strcmp(dtype, "float32")) {
        uint32_t bits = (uint32_t)raw;
        float f;
        memcpy(&f, &bits, 4);
        printf("%.9g", f);
    } else if (!strcmp(dtype, "float64")) {
        double f;
        memcpy(&f, &raw, 8);
        printf("%.17g", f);
    } else if (!strcmp(dtype, "float16")) {
        printf("%.5g", half_to_double((uint16_t)raw));
    } else if (!strcmp(dtype, "int8")) printf("%d", (int8_t)raw);
    else if (!strcmp(dtype, "int16")) printf("%d", (int16_t)raw);
    else if (!strcmp(dtype, "int32")) printf("%" PRId32, (int32_t)raw);
    else if (!strcmp(dtype, "int64")) { int64_t x; memcpy(&x, &raw, 8); printf("%" PRId64, x); }
    else printf("%" PRIu64, raw); /* bool, uint8 */
}

/* "2,4" -> dims; each 0 <= d < 2^40, rank 1..8; returns the element count. */
static uint64_t parse_shape(const char *text, int64_t *dims, int *rank)
{
    uint64_t count = 1;
    const char *p = text;
    *rank = 0;
    for (;;) {
        char *end;
        if (*rank == MAX_RANK)
            die("shape '%s' has more than %d dimensions", text, MAX_RANK);
        if (*p < '0' || *p > '9')
            die("shape '%s': expected comma-separated non-negative integers", text);
        errno = 0;
        unsigned long long d = strtoull(p, &end, 10);
        if (errno || d >= MAX_DIM)
            die("shape '%s': dimension out of range", text);
        dims[(*rank)++] = (int64_t)d;
        if (d && count > UINT64_MAX / d)
            die("shape '%s' is too large", text);
        count *= d;
        if (*end == '\0')
            return count;
        if (*end != ',')
            die("shape '%s': expected comma-separated non-negative integers", text);
        p = end + 1;
    }
}

/* Ask INFO for the model's first input (name, dtype) (section 7.7), unless the user
 * named it (--input: for servers without INFO, like bench/baselines/zmq_server.py). */
static void first_input(client_t *c, const char *model, const char *given, desc_t *in,
                        reply_t *r)
{
    if (given) {
        in->name = given;
        in->name_len = (uint32_t)strlen(given);
        strcpy(in->dtype, "float32");
        return;
    }
    buf_t b = { 0 };
    uint64_t id = header_begin(c, &b, 1);
    mp_put_cstr(&b, "model");
    mp_put_cstr(&b, model);
    call(c, CMD_INFO, &b, id, NULL, NULL, 0, r);
    free(b.data);
    mp_in inputs = need_field(need_field(r->header, "model"), "inputs");
    mp_val v;
    if (!mp_read(&inputs, &v) || v.type != MP_ARRAY || v.n == 0)
        die("malformed reply: model '%s' has no inputs", model);
    read_desc(&inputs, in);
    if (strcmp(in->dtype, "float32") != 0)
        die("model '%s' input '%.*s' is %s; this client sends float32 only", model,
            (int)in->name_len, in->name, in->dtype);
}

/* The INFER header (section 7.5); the id is a fixed-width uint32 at a known offset so the
 * load generator can patch it in place. Returns that offset. */
static size_t infer_header(client_t *c, buf_t *b, const char *model, const desc_t *in,
                           const int64_t *dims, int rank, double deadline_ms)
{
    size_t id_at;
    b->len = 0;
    mp_put_map(b, 3u + (c->tenant ? 1u : 0u) + (deadline_ms > 0 ? 1u : 0u));
    mp_put_cstr(b, "id");
    id_at = b->len + 1; /* after the 0xce byte */
    mp_put_uint32_fixed(b, 0);
    mp_put_cstr(b, "model");
    mp_put_cstr(b, model);
    mp_put_cstr(b, "inputs");
    mp_put_array(b, 1);
    mp_put_array(b, 3);
    mp_put_str(b, in->name, in->name_len);
    mp_put_cstr(b, "float32");
    mp_put_array(b, (uint32_t)rank);
    for (int i = 0; i < rank; i++)
        mp_put_uint(b, (uint64_t)dims[i]);
    if (c->tenant) {
        mp_put_cstr(b, "tenant");
        mp_put_cstr(b, c->tenant);
    }
    if (deadline_ms > 0) {
        mp_put_cstr(b, "deadline_ms");
        mp_put_double(b, deadline_ms);
    }
    return id_at;
}

static void patch_id(buf_t *b, size_t at, uint32_t id)
{
    b->data[at] = (uint8_t)(id >> 24);
    b->data[at + 1] = (uint8_t)(id >> 16);
    b->data[at + 2] = (uint8_t)(id >> 8);
    b->data[at + 3] = (uint8_t)id;
}

static float *filled_input(uint64_t count, float value, size_t *nbytes)
{
    if (count > (SIZE_MAX / 2) / sizeof(float))
        die("input too large");
    *nbytes = (size_t)count * sizeof(float);
    float *data = xmalloc(*nbytes);
    for (uint64_t i = 0; i < count; i++)
        data[i] = value; /* a little-endian host's floats are the wire format */
    return data;
}

/* ================================================================ commands */

static int cmd_ping(client_t *c)
{
    buf_t b = { 0 };
    reply_t r = { 0 };
    const char *server = "";
    uint32_t n = 0;
    double t0 = now_s();
    uint64_t id = header_begin(c, &b, 0);
    call(c, CMD_PING, &b, id, NULL, NULL, 0, &r);
    double rtt = now_s() - t0;
    get_str(r.header, "server", &server, &n);
    printf("server: %.*s (%.3f ms)\n", (int)n, server, rtt * 1e3);
    reply_destroy(&r);
    free(b.data);
    return 0;
}

static int cmd_list(client_t *c)
{
    buf_t b = { 0 };
    reply_t r = { 0 };
    uint64_t id = header_begin(c, &b, 0);
    call(c, CMD_LIST, &b, id, NULL, NULL, 0, &r);
    mp_in models = need_field(r.header, "models");
    mp_val v;
    if (!mp_read(&models, &v) || v.type != MP_ARRAY)
        die("malformed reply: 'models' is not an array");
    for (uint32_t i = 0; i < v.n; i++) { /* one JSON object per model (section 12) */
        print_json(&models, 0);
        putchar('\n');
    }
    if (v.n == 0)
        fprintf(stderr, "no models\n");
    reply_destroy(&r);
    free(b.data);
    return 0;
}

static int cmd_upload(client_t *c, const char *name, const char *path, bool replace,
                      int64_t max_batch)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot open %s: %s", path, strerror(errno));
    uint8_t *chunk = xmalloc(CHUNK_BYTES);
    sha256_t sha;
    char hex[65];
    uint64_t size = 0;
    size_t got;
    sha256_init(&sha); /* first pass: size and SHA-256, without holding the file */
    while ((got = fread(chunk, 1, CHUNK_BYTES, f)) > 0) {
        sha256_update(&sha, chunk, got);
        size += got;
    }
    if (ferror(f))
        die("cannot read %s", path);
    sha256_hex(&sha, hex);

    buf_t b = { 0 };
    reply_t r = { 0 };
    /* UPLOAD_BEGIN (7.2): name, size, sha256 [, replace, max_batch] -> upload handle */
    uint64_t id = header_begin(c, &b, 3u + (replace ? 1u : 0u) + (max_batch > 0 ? 1u : 0u));
    mp_put_cstr(&b, "name");
    mp_put_cstr(&b, name);
    mp_put_cstr(&b, "size");
    mp_put_uint(&b, size);
    mp_put_cstr(&b, "sha256");
    mp_put_str(&b, hex, 64);
    if (replace) {
        mp_put_cstr(&b, "replace");
        mp_put_bool(&b, true);
    }
    if (max_batch > 0) {
        mp_put_cstr(&b, "max_batch");
        mp_put_uint(&b, (uint64_t)max_batch);
    }
    call(c, CMD_UPLOAD_BEGIN, &b, id, NULL, NULL, 0, &r);
    const char *h;
    uint32_t hn;
    if (!get_str(r.header, "upload", &h, &hn) || hn == 0 || hn > 256)
        die("malformed reply: no upload handle");
    char handle[257];
    memcpy(handle, h, hn);
    handle[hn] = '\0';

    /* UPLOAD_CHUNK (7.3): 1 MiB at a time, each reply checked before the next chunk */
    rewind(f);
    uint64_t offset = 0;
    while ((got = fread(chunk, 1, CHUNK_BYTES, f)) > 0) {
        const void *payload[1] = { chunk };
        size_t sizes[1] = { got };
        id = header_begin(c, &b, 2);
        mp_put_cstr(&b, "upload");
        mp_put_str(&b, handle, hn);
        mp_put_cstr(&b, "offset");
        mp_put_uint(&b, offset);
        call(c, CMD_UPLOAD_CHUNK, &b, id, payload, sizes, 1, &r);
        offset += got;
    }
    if (ferror(f) || offset != size)
        die("%s changed while uploading it", path);
    fclose(f);

    /* UPLOAD_COMMIT (7.4): answered once the model is validated, profiled, registered */
    id = header_begin(c, &b, 1);
    mp_put_cstr(&b, "upload");
    mp_put_str(&b, handle, hn);
    call(c, CMD_UPLOAD_COMMIT, &b, id, NULL, NULL, 0, &r);
    mp_in model = need_field(r.header, "model");
    const char *mname, *msha;
    uint32_t mn, sn;
    int64_t mb = 0;
    if (!get_str(model, "name", &mname, &mn) || !get_str(model, "sha256", &msha, &sn))
        die("malformed reply: model info without name or sha256");
    get_int(model, "max_batch", &mb);
    if (sn != 64 || memcmp(msha, hex, 64) != 0)
        die("the broker stored sha256 %.*s, we sent %s", (int)sn, msha, hex);
    printf("model %.*s sha256 %.*s size %" PRIu64 " max_batch %" PRId64 "\n", (int)mn, mname,
           (int)sn, msha, size, mb);
    reply_destroy(&r);
    free(b.data);
    free(chunk);
    return 0;
}

static int cmd_infer(client_t *c, const char *model, const char *input, const char *shape,
                     float value, double deadline_ms)
{
    reply_t r = { 0 };
    desc_t in;
    int64_t dims[MAX_RANK];
    int rank;
    uint64_t count = parse_shape(shape, dims, &rank);
    first_input(c, model, input, &in, &r);
    char *in_name = xmalloc(in.name_len);
    memcpy(in_name, in.name, in.name_len);
    in.name = in_name; /* r's frames are about to be reused */

    size_t nbytes;
    float *data = filled_input(count, value, &nbytes);
    buf_t b = { 0 };
    size_t id_at = infer_header(c, &b, model, &in, dims, rank, deadline_ms);
    uint64_t id = c->next_id++;
    if (id > UINT32_MAX)
        die("request id overflow");
    patch_id(&b, id_at, (uint32_t)id);
    const void *payload[1] = { data };
    size_t sizes[1] = { nbytes };
    call(c, CMD_INFER, &b, id, payload, sizes, 1, &r);

    /* outputs: descriptions in the header, one payload frame each, same order */
    mp_in outs = need_field(r.header, "outputs");
    mp_val v;
    if (!mp_read(&outs, &v) || v.type != MP_ARRAY)
        die("malformed reply: 'outputs' is not an array");
    if ((size_t)v.n != r.n - 4)
        die("malformed reply: %" PRIu32 " outputs described, %zu payload frames", v.n, r.n - 4);
    for (uint32_t i = 0; i < v.n; i++) {
        desc_t d;
        read_desc(&outs, &d);
        size_t isz = dtype_size(d.dtype);
        if (!isz)
            die("malformed reply: unknown dtype '%s'", d.dtype);
        uint64_t n = 1;
        for (int k = 0; k < d.rank; k++) {
            if (d.dims[k] < 0 || (d.dims[k] && n > UINT64_MAX / 8 / (uint64_t)d.dims[k]))
                die("malformed reply: bad output shape");
            n *= (uint64_t)d.dims[k];
        }
        zmq_msg_t *frame = &r.frames[4 + i];
        if (zmq_msg_size(frame) != n * isz)
            die("malformed reply: output '%.*s' has %zu bytes, its shape needs %" PRIu64,
                (int)d.name_len, d.name, zmq_msg_size(frame), n * isz);
        printf("output %.*s %s ", (int)d.name_len, d.name, d.dtype);
        print_shape(&d);
        printf(" values:");
        const uint8_t *p = zmq_msg_data(frame);
        for (uint64_t k = 0; k < n && k < 16; k++) {
            putchar(' ');
            print_element(d.dtype, p + k * isz);
        }
        printf(n > 16 ? " ...\n" : "\n");
    }
    mp_in timing;
    if (mp_find(r.header, "timing", &timing)) {
        printf("timing: ");
        print_json(&timing, 0);
        putchar('\n');
    }
    int64_t batch;
    if (get_int(r.header, "batch", &batch))
        printf("batch: %" PRId64 "\n", batch);
    reply_destroy(&r);
    free(b.data);
    free(data);
    free(in_name);
    return 0;
}

/* ---------------------------------------------------------------- load generator */

typedef struct {
    int64_t status;
    uint64_t count;
} status_count_t;

/* Receive one INFER reply on the hot path: check the frames, read id and status in one
 * pass over the header, drop the payload. Returns false if nothing is waiting. */
static bool load_recv(client_t *c, zmq_msg_t *m, bool block, uint64_t *id, bool *has_id,
                      int64_t *status, const char **err, uint32_t *err_len)
{
    size_t nframe = 0;
    int more = 1;
    *has_id = false;
    *status = -1;
    *err = "";
    *err_len = 0;
    while (more) {
        int rc = zmq_msg_recv(m, c->sock, nframe == 0 && !block ? ZMQ_DONTWAIT : 0);
        if (rc < 0) {
            if (errno == EAGAIN && nframe == 0)
                return false;
            if (errno == EINTR)
                continue;
            die("zmq_msg_recv: %s", zmq_strerror(errno));
        }
        more = zmq_msg_more(m);
        const uint8_t *data = zmq_msg_data(m);
        size_t size = zmq_msg_size(m);
        if ((nframe == 0 && size != 0) || (nframe == 1 && (size != 4 || memcmp(data, TAG, 4))) ||
            (nframe == 2 && (size != 1 || data[0] != CMD_INFER)))
            die("malformed reply: bad frame %zu", nframe);
        if (nframe == 3) {
            mp_in in = { data, data + size };
            mp_val v;
            if (!mp_read(&in, &v) || v.type != MP_MAP)
                die("malformed reply: header is not a map");
            for (uint32_t i = 0; i < v.n; i++) {
                mp_val k, x;
                if (!mp_read(&in, &k))
                    die("malformed reply: truncated header");
                if (mp_is_key(&k, "id") || mp_is_key(&k, "status") || mp_is_key(&k, "error")) {
                    if (!mp_read(&in, &x))
                        die("malformed reply: truncated header");
                    if (k.s[0] == 'i') {
                        if (x.type != MP_UINT)
                            die("malformed reply: 'id' is not an unsigned integer");
                        *has_id = true;
                        *id = x.u;
                    } else if (k.s[0] == 's') {
                        if (!val_to_i64(&x, status))
                            die("malformed reply: 'status' is not an integer");
                    } else if (x.type == MP_STR) {
                        *err = x.s; /* only valid until the next recv: used at once */
                        *err_len = x.n;
                    }
                } else if (!mp_skip_items(&in, &k) || !mp_skip(&in)) {
                    die("malformed reply: bad header");
                }
            }
            if (*status < 0)
                die("malformed reply: no 'status'");
        }
        nframe++;
    }
    if (nframe < 4)
        die("malformed reply: %zu frames", nframe);
    return true;
}

static int cmd_load(client_t *c, const char *model, const char *input, const char *shape,
                    uint64_t total, uint64_t window, double deadline_ms)
{
    reply_t r = { 0 };
    desc_t in;
    int64_t dims[MAX_RANK];
    int rank;
    uint64_t count = parse_shape(shape, dims, &rank);
    first_input(c, model, input, &in, &r);
    char *in_name = xmalloc(in.name_len);
    memcpy(in_name, in.name, in.name_len);
    in.name = in_name;
    reply_destroy(&r);

    /* Ids base .. base+total-1, all encoded as uint32 (ce xx xx xx xx) so one
     * pre-encoded header serves every request: only the 4 id bytes change. */
    uint64_t base = c->next_id;
    if (total > UINT32_MAX - base)
        die("N must be below %" PRIu64, (uint64_t)UINT32_MAX - base);
    size_t nbytes;
    float *data = filled_input(count, 1.0f, &nbytes);
    buf_t b = { 0 };
    size_t id_at = infer_header(c, &b, model, &in, dims, rank, deadline_ms);
    uint8_t *state = calloc((size_t)total, 1); /* 0 unsent, 1 outstanding, 2 answered */
    if (!state)
        die("out of memory");
    status_count_t counts[64];
    size_t ncounts = 0;
    uint64_t sent = 0, received = 0, ok = 0;
    zmq_msg_t m;
    zmq_msg_init(&m);
    const void *payload[1] = { data };
    size_t sizes[1] = { nbytes };

    double t0 = now_s();
    while (received < total) {
        while (sent < total && sent - received < window) {
            patch_id(&b, id_at, (uint32_t)(base + sent));
            send_request(c, CMD_INFER, &b, payload, sizes, 1);
            state[sent++] = 1;
        }
        /* Drain what is there; block (with the timeout) only when nothing is. */
        bool block = false;
        for (;;) {
            uint64_t id = 0;
            bool has_id;
            int64_t status;
            const char *err;
            uint32_t err_len;
            if (!load_recv(c, &m, block, &id, &has_id, &status, &err, &err_len)) {
                if (received == total || (sent < total && sent - received < window))
                    break; /* go and send more */
                if (!wait_readable(c->sock, c->timeout_ms)) {
                    char detail[80];
                    snprintf(detail, sizeof detail, " (%" PRIu64 " of %" PRIu64 " answered)",
                             received, total);
                    die_no_reply(c, detail);
                }
                block = true;
                continue;
            }
            block = false;
            if (!has_id)
                die("a reply without id ([status %" PRId64 " %s] %.*s): cannot match it",
                    status, status_name(status), (int)err_len, err);
            if (id < base || id - base >= total || state[id - base] != 1)
                die("reply id %" PRIu64 " was not outstanding (unknown or answered twice)", id);
            state[id - base] = 2;
            received++;
            if (status == 0) {
                ok++;
            } else {
                size_t k = 0;
                while (k < ncounts && counts[k].status != status)
                    k++;
                if (k == ncounts) {
                    if (ncounts == sizeof counts / sizeof counts[0])
                        die("too many distinct statuses");
                    counts[ncounts].status = status;
                    counts[ncounts++].count = 0;
                }
                counts[k].count++;
            }
        }
    }
    double seconds = now_s() - t0;
    zmq_msg_close(&m);

    printf("{\"requests\": %" PRIu64 ", \"ok\": %" PRIu64 ", \"errors\": {", total, ok);
    for (size_t k = 0; k < ncounts; k++)
        printf("%s\"%" PRId64 "\": %" PRIu64, k ? ", " : "", counts[k].status, counts[k].count);
    printf("}, \"seconds\": %.6f, \"rps\": %.1f}\n", seconds,
           seconds > 0 ? (double)total / seconds : 0.0);
    free(state);
    free(data);
    free(b.data);
    free(in_name);
    return 0;
}

/* ================================================================ key file (CURVE) */

/* An mtserve key file (mtcore/keys.py): ZPL text, the subset czmq certificates use.
 *
 *   #   mtserve key: tenant "alice". Secret: keep it mode 0600.
 *   metadata
 *       name = "alice"
 *       server-key = "<the broker's public key, 40 Z85 characters>"
 *       endpoint = "tcp://127.0.0.1:5555"
 *   curve
 *       public-key = "<40 Z85 characters>"
 *       secret-key = "<40 Z85 characters>"
 *
 * Comments, blank lines and unindented section names are skipped; every other line must
 * be `<indent>name = "value"`. A client needs public-key, secret-key and server-key. */

#define KEY_FILE_MAX (64u * 1024) /* a key file is a few hundred bytes: refuse big ones */
#define Z85_KEY_LEN 40            /* a 32-byte CURVE key as Z85 text */

static const char Z85_CHARS[] =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

typedef struct {
    char public_key[Z85_KEY_LEN + 1]; /* NUL-terminated: zmq_setsockopt takes 41 bytes */
    char secret_key[Z85_KEY_LEN + 1];
    char server_key[Z85_KEY_LEN + 1];
    char *endpoint; /* NULL when the file has none */
} keyfile_t;

/* Zero memory that held a secret; the volatile store cannot be optimized away. */
static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--)
        *v++ = 0;
}

static char *key_text; /* the file's bytes while parsing (it holds the secret key) */
static size_t key_text_size;

/* Like die(), but wipes the file's text (after formatting: an argument may point into
 * it). Messages name fields, never quote a value. */
static void key_die(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (key_text) {
        wipe(key_text, key_text_size);
        free(key_text);
        key_text = NULL;
    }
    die("%s", msg);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

static bool is_name_char(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c != '\0' && strchr("$-_@.&+/", c) != NULL);
}

/* 40 characters of the Z85 alphabet, each group of 5 a value below 2^32 (what
 * zmq_z85_decode accepts). */
static bool z85_key_ok(const char *s, size_t n)
{
    if (n != Z85_KEY_LEN)
        return false;
    for (size_t g = 0; g < n; g += 5) {
        uint64_t value = 0;
        for (size_t k = g; k < g + 5; k++) {
            const char *at = s[k] ? strchr(Z85_CHARS, s[k]) : NULL;
            if (!at)
                return false;
            value = value * 85 + (uint64_t)(at - Z85_CHARS);
        }
        if (value > UINT32_MAX)
            return false;
    }
    return true;
}

static void key_field(const char *path, const char *field, const char *v, size_t n, char *out)
{
    if (!z85_key_ok(v, n))
        key_die("%s: %s is not a CURVE key (40 Z85 characters)", path, field);
    memcpy(out, v, Z85_KEY_LEN);
    out[Z85_KEY_LEN] = '\0';
}

static void read_key_file(const char *path, keyfile_t *key)
{
    memset(key, 0, sizeof *key);
    FILE *f = fopen(path, "rb");
    if (!f)
        die("cannot read key file %s: %s", path, strerror(errno));
    key_text = xmalloc(KEY_FILE_MAX + 1);
    key_text_size = KEY_FILE_MAX + 1;
    size_t len = fread(key_text, 1, KEY_FILE_MAX + 1, f);
    int err = ferror(f) ? errno : 0;
    fclose(f);
    if (err)
        key_die("cannot read key file %s: %s", path, strerror(err));
    if (len > KEY_FILE_MAX)
        key_die("%s: larger than %u KiB, not a key file", path, KEY_FILE_MAX / 1024);
    if (memchr(key_text, '\0', len))
        key_die("%s: contains a NUL byte, not a key file", path);

    size_t lineno = 0;
    for (char *line = key_text; line < key_text + len;) {
        char *eol = memchr(line, '\n', (size_t)(key_text + len - line));
        char *end = eol ? eol : key_text + len;
        char *next = eol ? eol + 1 : end;
        lineno++;
        *end = '\0';
        char *p = line;
        while (is_space(*p))
            p++;
        if (*p == '\0' || *p == '#' || !is_space(line[0])) { /* blank, comment, section */
            line = next;
            continue;
        }
        char *name = p;
        while (is_name_char(*p))
            p++;
        size_t name_len = (size_t)(p - name);
        while (is_space(*p))
            p++;
        if (name_len == 0 || *p != '=')
            key_die("%s:%zu: not a `name = \"value\"` line", path, lineno);
        p++;
        while (is_space(*p))
            p++;
        if (*p != '"')
            key_die("%s:%zu: not a `name = \"value\"` line", path, lineno);
        char *value = ++p;
        while (*p && *p != '"')
            p++;
        if (*p != '"')
            key_die("%s:%zu: not a `name = \"value\"` line", path, lineno);
        size_t value_len = (size_t)(p - value);
        p++;
        while (is_space(*p))
            p++;
        if (*p != '\0')
            key_die("%s:%zu: not a `name = \"value\"` line", path, lineno);
        name[name_len] = '\0';
        if (value_len == 0) { /* an empty value counts as absent (as mtcore/keys.py) */
        } else if (!strcmp(name, "public-key")) {
            key_field(path, name, value, value_len, key->public_key);
        } else if (!strcmp(name, "secret-key")) {
            key_field(path, name, value, value_len, key->secret_key);
        } else if (!strcmp(name, "server-key")) {
            key_field(path, name, value, value_len, key->server_key);
        } else if (!strcmp(name, "endpoint")) {
            free(key->endpoint);
            key->endpoint = xmalloc(value_len + 1);
            memcpy(key->endpoint, value, value_len);
            key->endpoint[value_len] = '\0';
        }
        line = next;
    }
    wipe(key_text, key_text_size);
    free(key_text);
    key_text = NULL;

    if (!key->public_key[0])
        key_die("%s: no public-key (40 Z85 characters)", path);
    if (!key->secret_key[0])
        key_die("%s: no secret-key (a public key file? a client needs the .key_secret file)",
                path);
    if (!key->server_key[0])
        key_die("%s: no server-key (the broker's own key? a client needs a tenant's key file)",
                path);
}

/* Make the DEALER a CURVE client of the broker (before connect); wipes the secret. */
static void apply_key(void *sock, keyfile_t *key, const char *path)
{
    static const struct { int option; const char *name; size_t at; } opts[] = {
        { ZMQ_CURVE_SERVERKEY, "ZMQ_CURVE_SERVERKEY", offsetof(keyfile_t, server_key) },
        { ZMQ_CURVE_PUBLICKEY, "ZMQ_CURVE_PUBLICKEY", offsetof(keyfile_t, public_key) },
        { ZMQ_CURVE_SECRETKEY, "ZMQ_CURVE_SECRETKEY", offsetof(keyfile_t, secret_key) },
    };
    if (!zmq_has("curve")) {
        wipe(key->secret_key, sizeof key->secret_key);
        die("--key: this libzmq was built without CURVE support (zmq_has(\"curve\") is 0)");
    }
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
        const char *z85 = (const char *)key + opts[i].at; /* 40 chars + NUL: 41 bytes */
        if (zmq_setsockopt(sock, opts[i].option, z85, Z85_KEY_LEN + 1) != 0) {
            int err = errno;
            wipe(key->secret_key, sizeof key->secret_key);
            die("--key %s: setting %s failed: %s", path, opts[i].name, zmq_strerror(err));
        }
    }
    wipe(key->secret_key, sizeof key->secret_key);
}

/* ================================================================ main */

static void usage(void)
{
    fputs("usage: mtclient ADDRESS [--key FILE] [--tenant T] [--timeout S] COMMAND ...\n"
          "  ping\n"
          "  list\n"
          "  upload NAME FILE.onnx [--replace] [--max-batch B]\n"
          "  infer MODEL D0,D1,... V [--deadline-ms MS] [--input NAME]\n"
          "  load MODEL D0,D1,... N WINDOW [--deadline-ms MS] [--input NAME]\n"
          "  (--input: the float32 input's name; without it, INFO is asked)\n"
          "  --key FILE: authenticate with CURVE, using an mtserve key file (NAME.key_secret);\n"
          "    ADDRESS '-' then means the file's endpoint. A secure broker knows the tenant\n"
          "    from the key and ignores --tenant (still accepted). A wrong key gets no reply:\n"
          "    the --timeout (default 30 s) fires\n"
          "exit: 0 ok, 2 the broker answered an error status, 1 anything else\n",
          stderr);
    exit(1);
}

static double parse_double(const char *s, const char *what)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end)
        die("%s: '%s' is not a number", what, s);
    return v;
}

static uint64_t parse_count(const char *s, const char *what)
{
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9')
        die("%s: '%s' is not a positive integer", what, s);
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v == 0)
        die("%s: '%s' is not a positive integer", what, s);
    return v;
}

int main(int argc, char **argv)
{
    client_t c = { 0 };
    const char *pos[8];
    int npos = 0;
    const char *input = NULL;
    bool replace = false;
    int64_t max_batch = 0;
    double deadline_ms = 0, timeout_s = 30.0;
    c.next_id = 1;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) usage();
        else if (!strcmp(a, "--replace")) replace = true;
        else if (!strcmp(a, "--tenant") && has_value) c.tenant = argv[++i];
        else if (!strcmp(a, "--key") && has_value) c.key_path = argv[++i];
        else if (!strcmp(a, "--input") && has_value) input = argv[++i];
        else if (!strcmp(a, "--timeout") && has_value)
            timeout_s = parse_double(argv[++i], "--timeout");
        else if (!strcmp(a, "--deadline-ms") && has_value)
            deadline_ms = parse_double(argv[++i], "--deadline-ms");
        else if (!strcmp(a, "--max-batch") && has_value)
            max_batch = (int64_t)parse_count(argv[++i], "--max-batch");
        else if (!strncmp(a, "--", 2)) { fprintf(stderr, "unknown or incomplete option %s\n", a); usage(); }
        else if (npos < 8) pos[npos++] = a;
        else usage();
    }
    if (npos < 2 || timeout_s <= 0 || timeout_s > 1e6 || deadline_ms < 0)
        usage();
    c.address = pos[0];
    c.timeout_ms = (long)(timeout_s * 1000.0);
    const char *cmd = pos[1];
    keyfile_t key = { { 0 }, { 0 }, { 0 }, NULL };
    if (c.key_path) /* read and checked before any socket exists */
        read_key_file(c.key_path, &key);
    if (!strcmp(c.address, "-")) {
        if (!key.endpoint)
            die("ADDRESS '-' means the endpoint of the --key file, and %s",
                c.key_path ? "that file has no endpoint" : "no --key was given");
        c.address = key.endpoint;
    }

    c.ctx = zmq_ctx_new();
    c.sock = zmq_socket(c.ctx, ZMQ_DEALER);
    if (!c.ctx || !c.sock)
        die("cannot create a ZeroMQ socket: %s", zmq_strerror(errno));
    int zero = 0; /* no high-water mark (the load generator's window is the bound); no linger */
    zmq_setsockopt(c.sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(c.sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(c.sock, ZMQ_LINGER, &zero, sizeof zero);
    if (c.key_path)
        apply_key(c.sock, &key, c.key_path);
    if (zmq_connect(c.sock, c.address) != 0)
        die("cannot connect to %s: %s", c.address, zmq_strerror(errno));

    int rc;
    if (!strcmp(cmd, "ping") && npos == 2)
        rc = cmd_ping(&c);
    else if (!strcmp(cmd, "list") && npos == 2)
        rc = cmd_list(&c);
    else if (!strcmp(cmd, "upload") && npos == 4)
        rc = cmd_upload(&c, pos[2], pos[3], replace, max_batch);
    else if (!strcmp(cmd, "infer") && npos == 5)
        rc = cmd_infer(&c, pos[2], input, pos[3], (float)parse_double(pos[4], "V"), deadline_ms);
    else if (!strcmp(cmd, "load") && npos == 6)
        rc = cmd_load(&c, pos[2], input, pos[3], parse_count(pos[4], "N"),
                      parse_count(pos[5], "WINDOW"), deadline_ms);
    else
        usage();
    fflush(stdout);
    zmq_close(c.sock);
    zmq_ctx_term(c.ctx);
    free(key.endpoint);
    return rc;
}
