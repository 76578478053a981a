/* A trivial WebSocket layer-2 switch: the calibration target of the load generator.
 *
 * Same wire protocol as wsnic (one ethernet frame per binary message), but no TAPs and no
 * kernel bridge: it learns source MACs per client, forwards by destination MAC, floods
 * broadcast/multicast/unknown. One thread, epoll, non-blocking sockets. A destination whose
 * output buffer is over OUT_LIMIT loses the frame (counted). What the load generator reaches
 * against this switch is its own ceiling on this machine.
 *
 *   trivial_switch [--listen 127.0.0.1] [--port 8086] [--duration SECONDS]
 *
 * Prints "LISTENING port" on stderr when ready; on SIGTERM/SIGINT (or after --duration,
 * default 600 s) prints one JSON object with its counters on stdout and exits. */
#include "ws_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#define MAX_CLIENTS 4096
#define OUT_LIMIT (1u << 20)
#define READ_CHUNK (256u * 1024)
#define MAX_MESSAGE 65536
#define FDB_SLOTS 8192 /* power of two, > 2 * MAX_CLIENTS MACs is plenty for a bench */

struct client {
    int fd;
    int open;     /* upgrade done */
    int dirty;    /* output appended since the last flush */
    int want_out; /* EPOLLOUT registered */
    struct buf in, out;
};

struct fdb_entry {
    uint8_t mac[6];
    int used;
    int client;
};

static struct client *clients[MAX_CLIENTS];
static struct fdb_entry fdb[FDB_SLOTS];
static int epfd;
static int dirty_list[2 * MAX_CLIENTS], ndirty; /* a reused id may be listed twice */
static volatile sig_atomic_t stop_flag;
static uint64_t st_accepted, st_upgraded, st_frames_in, st_bytes_in, st_forwarded, st_flooded,
    st_dropped_full, st_closed, st_bad;

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static unsigned fdb_hash(const uint8_t *mac)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < 6; i++) h = (h ^ mac[i]) * 16777619u;
    return h & (FDB_SLOTS - 1);
}

static void fdb_learn(const uint8_t *mac, int client)
{
    unsigned i = fdb_hash(mac);
    for (unsigned n = 0; n < FDB_SLOTS; n++, i = (i + 1) & (FDB_SLOTS - 1)) {
        if (!fdb[i].used || !memcmp(fdb[i].mac, mac, 6)) {
            memcpy(fdb[i].mac, mac, 6);
            fdb[i].used = 1;
            fdb[i].client = client;
            return;
        }
    }
}

static int fdb_lookup(const uint8_t *mac)
{
    unsigned i = fdb_hash(mac);
    for (unsigned n = 0; n < FDB_SLOTS && fdb[i].used; n++, i = (i + 1) & (FDB_SLOTS - 1))
        if (!memcmp(fdb[i].mac, mac, 6)) return fdb[i].client;
    return -1;
}

static void set_events(struct client *c, int id, int want_out)
{
    if (c->want_out == want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.u32 = (uint32_t)id};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

static void close_client(int id)
{
    struct client *c = clients[id];
    if (!c) return;
    close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    free(c);
    clients[id] = NULL;
    st_closed++;
    /* Forget its MACs: rebuild the table without them (rare, and bounded by FDB_SLOTS). */
    static struct fdb_entry keep[FDB_SLOTS];
    int nkeep = 0;
    for (int i = 0; i < FDB_SLOTS; i++)
        if (fdb[i].used && fdb[i].client != id) keep[nkeep++] = fdb[i];
    memset(fdb, 0, sizeof fdb);
    for (int i = 0; i < nkeep; i++) fdb_learn(keep[i].mac, keep[i].client);
}

static void queue_to(int id, const uint8_t *frame, size_t len)
{
    struct client *c = clients[id];
    if (!c || !c->open) return;
    if (buf_used(&c->out) > OUT_LIMIT) {
        st_dropped_full++;
        return;
    }
    buf_reserve(&c->out, len + 10);
    c->out.len += ws_put_header(c->out.p + c->out.len, OP_BINARY, len, NULL);
    memcpy(c->out.p + c->out.len, frame, len);
    c->out.len += len;
    if (!c->dirty) {
        c->dirty = 1;
        dirty_list[ndirty++] = id;
    }
}

static void queue_control(int id, int opcode, const uint8_t *payload, size_t len)
{
    struct client *c = clients[id];
    buf_reserve(&c->out, len + 10);
    c->out.len += ws_put_header(c->out.p + c->out.len, opcode, len, NULL);
    memcpy(c->out.p + c->out.len, payload, len);
    c->out.len += len;
    if (!c->dirty) {
        c->dirty = 1;
        dirty_list[ndirty++] = id;
    }
}

static void switch_frame(int from, const uint8_t *frame, size_t len)
{
    st_frames_in++;
    st_bytes_in += len;
    if (len < 14) {
        st_bad++;
        return;
    }
    if (!(frame[6] & 1)) fdb_learn(frame + 6, from);
    int to = (frame[0] & 1) ? -1 : fdb_lookup(frame);
    if (to >= 0 && to != from) {
        st_forwarded++;
        queue_to(to, frame, len);
        return;
    }
    if (to == from) return;
    st_flooded++;
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (i != from && clients[i] && clients[i]->open) queue_to(i, frame, len);
}

/* The upgrade request: answer 101 with the accept key; 0 = wait for more, -1 = drop. */
static int handshake(int id)
{
    struct client *c = clients[id];
    const char *head = (const char *)c->in.p + c->in.off;
    size_t n = buf_used(&c->in);
    const char *end = memmem(head, n, "\r\n\r\n", 4);
    if (!end) return n > 16384 ? -1 : 0;
    size_t hlen = (size_t)(end - head) + 4, klen;
    const char *key = http_header(head, hlen, "Sec-WebSocket-Key", &klen);
    if (!key) return -1;
    char accept[29];
    ws_accept_for(key, klen, accept);
    char resp[256];
    int r = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    buf_reserve(&c->out, (size_t)r);
    memcpy(c->out.p + c->out.len, resp, (size_t)r);
    c->out.len += (size_t)r;
    buf_consume(&c->in, hlen);
    c->open = 1;
    st_upgraded++;
    if (!c->dirty) {
        c->dirty = 1;
        dirty_list[ndirty++] = id;
    }
    return 1;
}

/* Parse every complete frame in the input buffer; -1 = drop the client. */
static int process_input(int id)
{
    struct client *c = clients[id];
    if (!c->open) {
        int h = handshake(id);
        if (h <= 0) return h;
    }
    for (;;) {
        uint8_t *p = c->in.p + c->in.off;
        size_t n = buf_used(&c->in);
        struct ws_frame f;
        int r = ws_parse_header(p, n, &f);
        if (r < 0 || (r > 0 && (!f.masked || f.len > MAX_MESSAGE))) return -1;
        if (r == 0 || n < f.hdr_len + f.len) return 0;
        uint8_t *payload = p + f.hdr_len;
        ws_xor(payload, (size_t)f.len, f.mask);
        if (f.opcode == OP_BINARY && f.fin) {
            switch_frame(id, payload, (size_t)f.len);
        } else if (f.opcode == OP_PING) {
            queue_control(id, OP_PONG, payload, (size_t)f.len);
        } else if (f.opcode == OP_CLOSE) {
            queue_control(id, OP_CLOSE, payload, f.len >= 2 ? 2 : 0);
            buf_flush(&clients[id]->out, clients[id]->fd);
            return -1;
        } else if (f.opcode != OP_PONG) {
            st_bad++; /* text or fragmented: not part of the protocol */
        }
        buf_consume(&c->in, f.hdr_len + (size_t)f.len);
    }
}

static void on_readable(int id)
{
    struct client *c = clients[id];
    /* Read a bounded amount per wake-up so one busy client cannot starve the others. */
    for (int round = 0; round < 4; round++) {
        buf_reserve(&c->in, READ_CHUNK);
        ssize_t n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close_client(id);
            return;
        }
        if (n < 0) return;
        c->in.len += (size_t)n;
        if (process_input(id) < 0) {
            close_client(id);
            return;
        }
        if ((size_t)n < READ_CHUNK) return;
    }
}

static void flush_dirty(void)
{
    for (int k = 0; k < ndirty; k++) {
        int id = dirty_list[k];
        struct client *c = clients[id];
        if (!c) continue;
        c->dirty = 0;
        if (buf_flush(&c->out, c->fd) < 0) {
            close_client(id);
            continue;
        }
        set_events(c, id, buf_used(&c->out) > 0);
    }
    ndirty = 0;
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int id = -1;
        for (int i = 0; i < MAX_CLIENTS; i++)
            if (!clients[i]) { id = i; break; }
        if (id < 0) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct client *c = xmalloc(sizeof *c);
        memset(c, 0, sizeof *c);
        c->fd = fd;
        buf_init(&c->in, READ_CHUNK);
        buf_init(&c->out, 64 * 1024);
        clients[id] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)id};
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
        st_accepted++;
    }
}

int main(int argc, char **argv)
{
    const char *addr = "127.0.0.1";
    int port = 8086;
    double duration = 600;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--listen") && i + 1 < argc) addr = argv[++i];
        else if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--duration") && i + 1 < argc) duration = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--listen ADDR] [--port PORT] [--duration S]\n", argv[0]);
            return 2;
        }
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, addr, &sin.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", addr);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&sin, sizeof sin) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    fprintf(stderr, "LISTENING %d\n", port);

    uint64_t deadline = now_ns() + (uint64_t)(duration * 1e9);
    struct epoll_event evs[256];
    while (!stop_flag && now_ns() < deadline) {
        int n = epoll_wait(epfd, evs, 256, 200);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == UINT32_MAX) {
                accept_all(lfd);
                continue;
            }
            if (!clients[id]) continue;
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable((int)id);
            if (clients[id] && (evs[i].events & EPOLLOUT) && !clients[id]->dirty) {
                clients[id]->dirty = 1;
                dirty_list[ndirty++] = (int)id;
            }
        }
        flush_dirty();
    }
    printf("{\"mode\":\"trivial_switch\",\"accepted\":%llu,\"upgraded\":%llu,\"frames_in\":%llu,"
           "\"bytes_in\":%llu,\"forwarded\":%llu,\"flooded\":%llu,\"dropped_full\":%llu,"
           "\"closed\":%llu,\"bad\":%llu}\n",
           (unsigned long long)st_accepted, (unsigned long long)st_upgraded,
           (unsigned long long)st_frames_in, (unsigned long long)st_bytes_in,
           (unsigned long long)st_forwarded, (unsigned long long)st_flooded,
           (unsigned long long)st_dropped_full, (unsigned long long)st_closed,
           (unsigned long long)st_bad);
    return 0;
}
