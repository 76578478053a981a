/* Shared by loadgen.c and trivial_switch.c: clock, byte buffers, SHA-1 + base64 for the
 * RFC 6455 handshake, WebSocket frame header parsing and writing, the bench frame layout.
 * Header-only (static functions) so each program is one `cc -O2 file.c` away. */
#ifndef WS_COMMON_H
#define WS_COMMON_H

#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

enum { OP_CONT = 0x0, OP_TEXT = 0x1, OP_BINARY = 0x2, OP_CLOSE = 0x8, OP_PING = 0x9,
       OP_PONG = 0xA };

/* Bench frames: ethernet header, ethertype 0x88B5 (IEEE local experimental), then
 * magic(4) sender(2) pad(2) seq(8) send-timestamp-ns(8). The smallest frame (60 B) holds it. */
#define BENCH_ETHERTYPE 0x88B5
#define MAGIC_DATA 0x574E5344u  /* "WNSD" */
#define MAGIC_HELLO 0x574E5348u /* "WNSH": gratuitous frame so the switch learns a MAC */
#define BENCH_HDR_LEN 38
#define ETH_HLEN_ 14

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "fatal: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n);
    if (!p) die("malloc");
    return p;
}

/* ---- byte buffer: live data is p[off, len) ---------------------------------------------- */

struct buf {
    uint8_t *p;
    size_t off, len, cap;
};

static void buf_init(struct buf *b, size_t cap)
{
    b->p = xmalloc(cap);
    b->off = b->len = 0;
    b->cap = cap;
}

static inline void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->off = b->len = b->cap = 0;
}

static inline size_t buf_used(const struct buf *b) { return b->len - b->off; }

/* Room for n more bytes at the end: compact first, grow only when that is not enough. */
static void buf_reserve(struct buf *b, size_t n)
{
    if (b->cap - b->len >= n) return;
    if (b->off) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->cap - b->len >= n) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < n) cap *= 2;
    b->p = realloc(b->p, cap);
    if (!b->p) die("realloc");
    b->cap = cap;
}

static inline void buf_consume(struct buf *b, size_t n)
{
    b->off += n;
    if (b->off == b->len) b->off = b->len = 0;
}

/* Write what is pending; returns 0 when all was written or the socket is full, -1 on error. */
static int buf_flush(struct buf *b, int fd)
{
    while (buf_used(b)) {
        ssize_t n = write(fd, b->p + b->off, buf_used(b));
        if (n > 0) {
            buf_consume(b, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
        return -1;
    }
    return 0;
}

/* ---- SHA-1 (FIPS 180-4), only for Sec-WebSocket-Accept ----------------------------------- */

static inline uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *blk)
{
    uint32_t w[80];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)blk[4 * i] << 24 | (uint32_t)blk[4 * i + 1] << 16 |
               (uint32_t)blk[4 * i + 2] << 8 | blk[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t t = rol32(a, 5) + f + e + k + w[i];
        e = d; d = c; c = rol32(b, 30); b = a; a = t;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20])
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    size_t i = 0;
    for (; i + 64 <= len; i += 64) sha1_block(h, data + i);
    uint8_t tail[128] = {0};
    size_t rest = len - i;
    memcpy(tail, data + i, rest);
    tail[rest] = 0x80;
    size_t tlen = rest + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int j = 0; j < 8; j++) tail[tlen - 1 - j] = (uint8_t)(bits >> (8 * j));
    sha1_block(h, tail);
    if (tlen == 128) sha1_block(h, tail + 64);
    for (int j = 0; j < 5; j++) {
        out[4 * j] = (uint8_t)(h[j] >> 24);
        out[4 * j + 1] = (uint8_t)(h[j] >> 16);
        out[4 * j + 2] = (uint8_t)(h[j] >> 8);
        out[4 * j + 3] = (uint8_t)h[j];
    }
}

static size_t base64(const uint8_t *in, size_t n, char *out)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

/* base64(SHA-1(key + GUID)): 28 characters and a NUL. */
static void ws_accept_for(const char *key, size_t keylen, char out[29])
{
    uint8_t tmp[128], digest[20];
    if (keylen > sizeof tmp - sizeof WS_GUID) keylen = sizeof tmp - sizeof WS_GUID;
    memcpy(tmp, key, keylen);
    memcpy(tmp + keylen, WS_GUID, sizeof WS_GUID - 1);
    sha1(tmp, keylen + sizeof WS_GUID - 1, digest);
    base64(digest, 20, out);
}

/* The value of header `name` (case-insensitive) in an HTTP head of `len` bytes, trimmed;
 * NULL when absent. */
static const char *http_header(const char *head, size_t len, const char *name, size_t *vlen)
{
    size_t nlen = strlen(name);
    const char *end = head + len;
    const char *line = memchr(head, '\n', len);
    while (line && line + 1 < end) {
        line++;
        const char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) eol = end;
        if ((size_t)(eol - line) > nlen && line[nlen] == ':' && !strncasecmp(line, name, nlen)) {
            const char *v = line + nlen + 1, *ve = eol;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
        line = eol < end ? eol : NULL;
    }
    return NULL;
}

/* ---- WebSocket frames ---------------------------------------------------------------------- */

struct ws_frame {
    int fin, opcode, masked;
    uint8_t mask[4];
    uint64_t len;     /* payload length */
    size_t hdr_len;   /* bytes before the payload */
};

/* Parse a frame header from p[0, n). Returns 1 when the header is complete, 0 when more bytes
 * are needed, -1 on a protocol error (reserved bits, a control frame > 125 bytes). */
static int ws_parse_header(const uint8_t *p, size_t n, struct ws_frame *f)
{
    if (n < 2) return 0;
    if (p[0] & 0x70) return -1;
    f->fin = p[0] >> 7;
    f->opcode = p[0] & 0x0F;
    f->masked = p[1] >> 7;
    uint64_t len = p[1] & 0x7F;
    size_t h = 2;
    if (len == 126) {
        if (n < 4) return 0;
        len = (uint64_t)p[2] << 8 | p[3];
        h = 4;
    } else if (len == 127) {
        if (n < 10) return 0;
        len = 0;
        for (int i = 0; i < 8; i++) len = len << 8 | p[2 + i];
        h = 10;
    }
    if ((f->opcode & 0x8) && (len > 125 || !f->fin)) return -1;
    if (f->masked) {
        if (n < h + 4) return 0;
        memcpy(f->mask, p + h, 4);
        h += 4;
    }
    f->len = len;
    f->hdr_len = h;
    return 1;
}

/* XOR `n` bytes at p with the 4-byte mask, word-wise where it can. */
static void ws_xor(uint8_t *p, size_t n, const uint8_t mask[4])
{
    uint32_t m32;
    memcpy(&m32, mask, 4);
    uint64_t m64 = (uint64_t)m32 << 32 | m32;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v;
        memcpy(&v, p + i, 8);
        v ^= m64;
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++) p[i] ^= mask[i & 3];
}

/* Header of a final frame; `mask` NULL for a server frame. Returns its length (<= 14). */
static size_t ws_put_header(uint8_t *out, int opcode, size_t len, const uint8_t *mask)
{
    size_t h = 0;
    out[h++] = (uint8_t)(0x80 | opcode);
    uint8_t mbit = mask ? 0x80 : 0;
    if (len < 126) {
        out[h++] = (uint8_t)(mbit | len);
    } else if (len < 65536) {
        out[h++] = mbit | 126;
        out[h++] = (uint8_t)(len >> 8);
        out[h++] = (uint8_t)len;
    } else {
        out[h++] = mbit | 127;
        for (int i = 7; i >= 0; i--) out[h++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    if (mask) {
        memcpy(out + h, mask, 4);
        h += 4;
    }
    return h;
}

static inline void put_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline uint16_t get_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline void put_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t get_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline void put_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint64_t get_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

#endif
