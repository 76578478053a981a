/* wsnic load generator: an RFC 6455 client for the one-ethernet-frame-per-binary-message protocol.
 *
 *   loadgen relay    --url ws://127.0.0.1:8086/ [--size 60] [--window 256] [--duration 3]
 *   loadgen overload --url URL [--senders 8] [--rate 0] [--sink-rate 0] [--size 60] [--duration 5]
 *   loadgen connect  --url URL [--clients 100] [--concurrency 0] [--timeout 10] [--hold 30]
 *   loadgen tap      --url URL --guest-ns NAME [--tap eth0]
 *
 * relay:    client A sends frames of --size bytes to client B (dst = B's MAC), keeping at most
 *           --window frames in flight (sent by A minus received by B).
 * overload: --senders clients send to one sink, unpaced (--rate 0) or paced at --rate frames/s
 *           each; the sink reads everything, or --sink-rate frames/s (a slow reader).
 *           Both first exchange gratuitous broadcast frames so the switch learns every MAC.
 *           Frames carry a sequence number and a CLOCK_MONOTONIC send time, so the receiver
 *           counts loss, forward gaps and backward steps (reordering) and one-way latency.
 *           Statistics cover frames sent in [warmup, warmup + duration); after that the sink
 *           gets --drain seconds to receive what is still on its way.
 * connect:  opens --clients connections at once (every connect() is issued before the event
 *           loop runs, so before any upgrade can complete), or at most --concurrency K at a
 *           time (K = 1: one after the other), reports when each upgrade finished,
 *           prints "UPGRADED n ms" on stderr, holds them idle (answering pings) until a line
 *           "close" on stdin, EOF, or --hold seconds, then closes them all with a close frame
 *           and reports when the server has closed each TCP connection.
 * tap:      a guest's NIC: connects, then enters /run/netns/NAME, creates TAP --tap there and
 *           copies frames both ways; prints "READY tap mac" on stdout; ends on SIGTERM/SIGINT
 *           or when the server closes.
 * Every mode prints one JSON object on stdout at the end. Every wait has a deadline. */
#include "ws_common.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>

#define MAX_SENDERS 62 /* senders plus the sink fit a 64-bit "seen hello" mask */
#define MAX_FRAME 65535
#define READ_CHUNK (256u * 1024)
#define SENDER_HIGH (64u * 1024) /* unpaced senders keep at most this much unwritten */
#define TAP_OUT_LIMIT (1u << 20) /* tap mode: frames beyond this backlog are dropped */
#define HELLO_EVERY_NS 200000000ull
#define HELLO_TIMEOUT_NS 5000000000ull
#define CONNECT_TIMEOUT_NS 10000000000ull

enum { ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSING, ST_CLOSED, ST_FAILED };
enum { ROLE_IDLE, ROLE_SENDER, ROLE_SINK, ROLE_TAP };

struct conn {
    int fd, id, role, state;
    uint32_t events; /* registered with epoll */
    struct buf in, out, frag;
    int frag_op;
    uint8_t mac[6];
    char key[25];
    uint64_t rng;
    uint64_t t_upgraded, t_closed;
    int http_status, close_rcvd, sent_close;
    uint64_t seen_hello; /* bit i: heard sender i's gratuitous frame (bit nsend: the sink's) */
    uint64_t other_frames, pings;
    /* sender */
    uint8_t *tmpl;
    uint64_t sent, sent_win, next_send;
    int blocked; /* output could not be written completely */
};

struct rx_stats {
    uint64_t recv_total, recv_win, expect, gaps, gap_frames, regressions;
};

static struct {
    const char *mode;
    char host[128], path[512];
    int port;
    int size, window, senders, clients, sink_rcvbuf, concurrency;
    double duration, warmup, drain, rate, sink_rate, timeout, hold, close_timeout, stall;
    const char *guest_ns, *tap;
} opt = {.port = 8086, .size = 60, .window = 256, .senders = 1, .clients = 100,
         .duration = 3, .warmup = 0.5, .drain = 0.5, .timeout = 10, .hold = 30,
         .close_timeout = 30, .stall = 0.2, .tap = "eth0"};

static int epfd;
static struct conn *conns;
static int nconns;
static struct rx_stats rx[MAX_SENDERS];
static uint64_t win_start = UINT64_MAX, win_end = UINT64_MAX;
static volatile sig_atomic_t stop_flag;
static uint64_t tap_to_ws, ws_to_tap, tap_drop_backlog, tap_drop_full;
static int tap_fd = -1;
static int throttle_sink; /* the slow sink is read on a timer once the run has started */

/* ---- latency histogram: log-linear in ns, 7 bits of mantissa (< 0.8 % error) ------------- */

#define HIST_N (256 + 48 * 128)
static uint64_t hist[HIST_N], hist_count, hist_max;

static void hist_add(uint64_t v)
{
    int idx;
    if (v < 256) {
        idx = (int)v;
    } else {
        int e = 63 - __builtin_clzll(v) - 7;
        idx = 256 + (e - 1) * 128 + (int)((v >> e) - 128);
        if (idx >= HIST_N) idx = HIST_N - 1;
    }
    hist[idx]++;
    hist_count++;
    if (v > hist_max) hist_max = v;
}

static double hist_pct_us(double q)
{
    if (!hist_count) return -1;
    uint64_t target = (uint64_t)ceil(q * (double)hist_count);
    if (target < 1) target = 1;
    uint64_t cum = 0;
    for (int i = 0; i < HIST_N; i++) {
        cum += hist[i];
        if (cum >= target) {
            if (i < 256) return i / 1000.0;
            int e = (i - 256) / 128 + 1;
            uint64_t m = (uint64_t)((i - 256) % 128 + 128);
            return (double)((m << e) + ((1ull << e) >> 1)) / 1000.0;
        }
    }
    return hist_max / 1000.0;
}

/* ---- helpers ------------------------------------------------------------------------------ */

static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void parse_url(const char *url)
{
    const char *p = url;
    if (!strncmp(p, "ws://", 5)) p += 5;
    else {
        fprintf(stderr, "only ws:// URLs: %s\n", url);
        exit(2);
    }
    const char *slash = strchr(p, '/');
    const char *hostend = slash ? slash : p + strlen(p);
    const char *colon = memchr(p, ':', (size_t)(hostend - p));
    size_t hlen = (size_t)((colon ? colon : hostend) - p);
    if (!hlen || hlen >= sizeof opt.host) {
        fprintf(stderr, "bad host in %s\n", url);
        exit(2);
    }
    memcpy(opt.host, p, hlen);
    opt.host[hlen] = 0;
    if (colon) opt.port = atoi(colon + 1);
    snprintf(opt.path, sizeof opt.path, "%s", slash ? slash : "/");
}

static double secs(uint64_t ns) { return (double)ns / 1e9; }

static void conn_events(struct conn *c)
{
    if (c->fd < 0) return;
    uint32_t ev = 0;
    if (c->state == ST_CONNECTING) {
        ev = EPOLLOUT;
    } else if (c->state != ST_CLOSED && c->state != ST_FAILED) {
        /* A slow sink is read on a timer, not when readable. */
        if (!(c->role == ROLE_SINK && throttle_sink)) ev |= EPOLLIN;
        if (buf_used(&c->out)) ev |= EPOLLOUT;
    }
    if (ev == c->events) return;
    struct epoll_event e = {.events = ev, .data.u32 = (uint32_t)c->id};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &e);
    c->events = ev;
}

static void conn_end(struct conn *c, int state, uint64_t now)
{
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->fd = -1;
    }
    c->state = state;
    c->t_closed = now;
}

static void conn_start(struct conn *c)
{
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *ai;
    char port[16];
    snprintf(port, sizeof port, "%d", opt.port);
    if (getaddrinfo(opt.host, port, &hints, &ai) != 0) {
        fprintf(stderr, "cannot resolve %s\n", opt.host);
        exit(2);
    }
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c->role == ROLE_SINK && opt.sink_rcvbuf > 0)
        setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &opt.sink_rcvbuf, sizeof opt.sink_rcvbuf);
    int r = connect(c->fd, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    if (r < 0 && errno != EINPROGRESS) {
        conn_end(c, ST_FAILED, now_ns());
        return;
    }
    c->state = ST_CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event e = {.events = EPOLLOUT, .data.u32 = (uint32_t)c->id};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &e) < 0) die("epoll_ctl");
}

static void send_request(struct conn *c)
{
    uint8_t raw[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t v = xorshift(&c->rng);
        memcpy(raw + i, &v, 8);
    }
    base64(raw, 16, c->key);
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     opt.path, opt.host, opt.port, c->key);
    buf_reserve(&c->out, (size_t)n);
    memcpy(c->out.p + c->out.len, req, (size_t)n);
    c->out.len += (size_t)n;
    c->state = ST_HANDSHAKE;
}

/* Append one masked client frame. */
static uint8_t *put_frame(struct conn *c, int opcode, const uint8_t *payload, size_t len)
{
    uint64_t r = xorshift(&c->rng);
    uint8_t mask[4];
    memcpy(mask, &r, 4);
    buf_reserve(&c->out, len + 14);
    uint8_t *o = c->out.p + c->out.len;
    size_t h = ws_put_header(o, opcode, len, mask);
    if (payload) memcpy(o + h, payload, len);
    c->out.len += h + len;
    return o + h; /* the caller may patch the payload and mask it itself */
}

static void put_masked(struct conn *c, int opcode, const uint8_t *payload, size_t len)
{
    uint8_t *p = put_frame(c, opcode, payload, len);
    ws_xor(p, len, p - 4);
}

static void send_hello(struct conn *c, int sid)
{
    uint8_t f[60] = {0};
    memset(f, 0xff, 6);
    memcpy(f + 6, c->mac, 6);
    put_be16(f + 12, BENCH_ETHERTYPE);
    put_le32(f + 14, MAGIC_HELLO);
    put_be16(f + 18, (uint16_t)sid);
    put_masked(c, OP_BINARY, f, sizeof f);
}

static void gen_frames(struct conn *c, uint64_t count, uint64_t now)
{
    size_t s = (size_t)opt.size;
    buf_reserve(&c->out, count * (s + 14));
    int in_win = now >= win_start && now < win_end;
    for (uint64_t i = 0; i < count; i++) {
        uint8_t *p = put_frame(c, OP_BINARY, c->tmpl, s);
        put_le64(p + 22, c->sent);
        put_le64(p + 30, now);
        ws_xor(p, s, p - 4);
        c->sent++;
        c->sent_win += (uint64_t)in_win;
    }
}

/* ---- receiving ------------------------------------------------------------------------------ */

static void on_frame(struct conn *c, const uint8_t *p, size_t len, uint64_t now)
{
    if (c->role == ROLE_TAP) {
        if (tap_fd >= 0) {
            if (write(tap_fd, p, len) < 0) tap_drop_full++;
            else ws_to_tap++;
        }
        return;
    }
    if (len < BENCH_HDR_LEN || get_be16(p + 12) != BENCH_ETHERTYPE) {
        c->other_frames++;
        return;
    }
    uint32_t magic = get_le32(p + 14);
    int sid = get_be16(p + 18);
    if (magic == MAGIC_HELLO) {
        if (sid < 64) c->seen_hello |= 1ull << sid;
        return;
    }
    if (magic != MAGIC_DATA || c->role != ROLE_SINK || memcmp(p, c->mac, 6) ||
        sid >= opt.senders) {
        c->other_frames++;
        return;
    }
    struct rx_stats *r = &rx[sid];
    uint64_t seq = get_le64(p + 22), ts = get_le64(p + 30);
    r->recv_total++;
    if (seq == r->expect) {
        r->expect++;
    } else if (seq > r->expect) {
        r->gaps++;
        r->gap_frames += seq - r->expect;
        r->expect = seq + 1;
    } else {
        r->regressions++;
    }
    if (ts >= win_start && ts < win_end) {
        r->recv_win++;
        hist_add(now > ts ? now - ts : 0);
    }
}

static void on_message(struct conn *c, int opcode, uint8_t *p, size_t len, uint64_t now)
{
    switch (opcode) {
    case OP_BINARY:
        on_frame(c, p, len, now);
        break;
    case OP_PING:
        c->pings++;
        put_masked(c, OP_PONG, p, len);
        break;
    case OP_CLOSE:
        c->close_rcvd = 1;
        if (!c->sent_close) {
            put_masked(c, OP_CLOSE, p, len >= 2 ? 2 : 0);
            c->sent_close = 1;
        }
        c->state = ST_CLOSING;
        break;
    default:
        c->other_frames++; /* text, pong */
    }
}

/* The 101 answer; returns 1 when done, 0 for more bytes, -1 when refused. */
static int on_response(struct conn *c, uint64_t now)
{
    const char *head = (const char *)c->in.p + c->in.off;
    size_t n = buf_used(&c->in);
    const char *end = memmem(head, n, "\r\n\r\n", 4);
    if (!end) return n > 16384 ? -1 : 0;
    size_t hlen = (size_t)(end - head) + 4, alen;
    c->http_status = n > 12 ? atoi(head + 9) : 0;
    const char *acc = http_header(head, hlen, "Sec-WebSocket-Accept", &alen);
    char want[29];
    ws_accept_for(c->key, strlen(c->key), want);
    buf_consume(&c->in, hlen);
    if (c->http_status != 101 || !acc || alen != 28 || memcmp(acc, want, 28)) return -1;
    c->state = ST_OPEN;
    c->t_upgraded = now;
    return 1;
}

/* Parse what is buffered; returns the number of data frames handled, -1 on a protocol error. */
static long parse_input(struct conn *c, uint64_t now)
{
    long frames = 0;
    if (c->state == ST_HANDSHAKE) {
        int r = on_response(c, now);
        if (r <= 0) return r;
    }
    for (;;) {
        uint8_t *p = c->in.p + c->in.off;
        size_t n = buf_used(&c->in);
        struct ws_frame f;
        int r = ws_parse_header(p, n, &f);
        if (r < 0 || (r > 0 && f.len > MAX_FRAME * 4ull)) return -1;
        if (r == 0 || n < f.hdr_len + f.len) return frames;
        uint8_t *payload = p + f.hdr_len;
        size_t len = (size_t)f.len;
        if (f.masked) ws_xor(payload, len, f.mask);
        if (f.opcode & 0x8) {
            on_message(c, f.opcode, payload, len, now);
        } else if (f.fin && f.opcode != OP_CONT && !buf_used(&c->frag)) {
            on_message(c, f.opcode, payload, len, now);
            frames++;
        } else {
            /* A fragmented message: gather it (bounded), deliver it at FIN. */
            if (f.opcode != OP_CONT) c->frag_op = f.opcode;
            if (buf_used(&c->frag) + len <= MAX_FRAME) {
                buf_reserve(&c->frag, len);
                memcpy(c->frag.p + c->frag.len, payload, len);
                c->frag.len += len;
            }
            if (f.fin) {
                on_message(c, c->frag_op, c->frag.p + c->frag.off, buf_used(&c->frag), now);
                c->frag.off = c->frag.len = 0;
                frames++;
            }
        }
        buf_consume(&c->in, f.hdr_len + len);
    }
}

/* Read (at most `limit` bytes, 0 = no limit) and parse; returns frames handled. */
static long conn_read(struct conn *c, size_t limit, uint64_t *nowp)
{
    long frames = 0;
    for (int round = 0; round < 4; round++) {
        size_t want = limit && limit < READ_CHUNK ? limit : READ_CHUNK;
        buf_reserve(&c->in, want);
        ssize_t n = read(c->fd, c->in.p + c->in.len, want);
        uint64_t now = now_ns();
        *nowp = now;
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            conn_end(c, c->state == ST_OPEN || c->state == ST_CLOSING ? ST_CLOSED : ST_FAILED,
                     now);
            return frames;
        }
        if (n < 0) return frames;
        c->in.len += (size_t)n;
        long f = parse_input(c, now);
        if (f < 0) {
            conn_end(c, ST_FAILED, now);
            return frames;
        }
        frames += f;
        if (limit) {
            limit -= (size_t)n;
            if (!limit) return frames;
        }
        if ((size_t)n < want) return frames;
    }
    return frames;
}

static void conn_flush(struct conn *c, uint64_t now)
{
    if (c->fd < 0 || c->state == ST_CONNECTING) return;
    if (buf_flush(&c->out, c->fd) < 0) {
        conn_end(c, c->state == ST_OPEN || c->state == ST_CLOSING ? ST_CLOSED : ST_FAILED, now);
        return;
    }
    c->blocked = buf_used(&c->out) > 0;
    conn_events(c);
}

/* One epoll event. */
static void on_event(struct conn *c, uint32_t ev, uint64_t *nowp)
{
    if (c->state == ST_CONNECTING) {
        if (!(ev & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            conn_end(c, ST_FAILED, now_ns());
            return;
        }
        send_request(c);
        conn_flush(c, *nowp);
        return;
    }
    if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_read(c, 0, nowp);
    if (c->fd >= 0 && (ev & EPOLLOUT)) conn_flush(c, *nowp);
}

static int poll_once(int timeout_ms, uint64_t *nowp)
{
    struct epoll_event evs[512];
    int n = epoll_wait(epfd, evs, 512, timeout_ms);
    *nowp = now_ns();
    for (int i = 0; i < n; i++) {
        uint32_t id = evs[i].data.u32;
        if (id == UINT32_MAX) {
            char line[64];
            ssize_t r = read(0, line, sizeof line);
            if (r <= 0 || memmem(line, (size_t)r, "close", 5)) stop_flag = 2;
            if (r <= 0) epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
            continue;
        }
        on_event(&conns[id], evs[i].events, nowp);
    }
    return n;
}

static void make_conns(int n)
{
    conns = calloc((size_t)n, sizeof *conns);
    if (!conns) die("calloc");
    nconns = n;
    uint64_t seed = now_ns() ^ ((uint64_t)getpid() << 32);
    for (int i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        c->id = i;
        c->fd = -1;
        c->rng = seed + 0x9E3779B97F4A7C15ull * (uint64_t)(i + 1);
        xorshift(&c->rng);
        /* Locally administered unicast: 02:57:4e:<pid>:<index> */
        c->mac[0] = 0x02;
        c->mac[1] = 0x57;
        c->mac[2] = 0x4e;
        c->mac[3] = (uint8_t)getpid();
        c->mac[4] = (uint8_t)(i >> 8);
        c->mac[5] = (uint8_t)i;
        buf_init(&c->in, 4096);
        buf_init(&c->out, 4096);
        buf_init(&c->frag, 0 + 64);
    }
}

static void print_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("\"loadgen_cpu_s\":%.3f",
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
               ru.ru_stime.tv_usec / 1e6);
}

/* Connect every conn and wait (bounded) until all are upgraded; 0 when they all are. */
static int connect_all(uint64_t deadline)
{
    uint64_t now = now_ns();
    for (int i = 0; i < nconns; i++) conn_start(&conns[i]);
    while (!stop_flag && now < deadline) {
        int open = 0, dead = 0;
        for (int i = 0; i < nconns; i++) {
            open += conns[i].state == ST_OPEN;
            dead += conns[i].state >= ST_CLOSING;
        }
        if (open + dead == nconns) return dead ? -1 : 0;
        poll_once(50, &now);
    }
    return -1;
}

/* ---- relay / overload ---------------------------------------------------------------------- */

static int run_traffic(void)
{
    int ns = opt.senders;
    make_conns(ns + 1);
    struct conn *sink = &conns[ns];
    sink->role = ROLE_SINK;
    for (int i = 0; i < ns; i++) {
        struct conn *c = &conns[i];
        c->role = ROLE_SENDER;
        c->tmpl = calloc(1, (size_t)opt.size);
        if (!c->tmpl) die("calloc");
        memcpy(c->tmpl, sink->mac, 6);
        memcpy(c->tmpl + 6, c->mac, 6);
        put_be16(c->tmpl + 12, BENCH_ETHERTYPE);
        put_le32(c->tmpl + 14, MAGIC_DATA);
        put_be16(c->tmpl + 18, (uint16_t)i);
    }
    uint64_t t0 = now_ns();
    const char *error = NULL;
    if (connect_all(t0 + CONNECT_TIMEOUT_NS) < 0) error = "connect";

    /* Gratuitous frames until the sink heard every sender and every sender heard the sink. */
    uint64_t now = now_ns(), hello_deadline = now + HELLO_TIMEOUT_NS, next_hello = 0;
    uint64_t all_senders = (ns >= 64) ? ~0ull : ((1ull << ns) - 1);
    while (!error) {
        int ready = (sink->seen_hello & all_senders) == all_senders;
        for (int i = 0; i < ns && ready; i++) ready = (conns[i].seen_hello >> ns) & 1;
        if (ready) break;
        if (now >= hello_deadline || stop_flag) {
            error = "the switch did not forward the gratuitous frames";
            break;
        }
        if (now >= next_hello) {
            for (int i = 0; i <= ns; i++) {
                send_hello(&conns[i], i);
                conn_flush(&conns[i], now);
            }
            next_hello = now + HELLO_EVERY_NS;
        }
        poll_once(10, &now);
        for (int i = 0; i <= ns; i++)
            if (conns[i].state != ST_OPEN) error = "a client was closed while learning MACs";
    }

    uint64_t run_start = now_ns();
    win_start = run_start + (uint64_t)(opt.warmup * 1e9);
    win_end = win_start + (uint64_t)(opt.duration * 1e9);
    uint64_t drain_end = win_end + (uint64_t)(opt.drain * 1e9);
    uint64_t interval = opt.rate > 0 ? (uint64_t)(1e9 / opt.rate) : 0;
    uint64_t burst = opt.rate > 0 ? (uint64_t)(opt.rate * 0.002) + 1 : 0;
    uint64_t forgiven = 0, stalls = 0, last_progress = run_start, last_recv = 0;
    uint64_t sink_tokens_ns = run_start;
    double tokens = 0;
    for (int i = 0; i < ns; i++) conns[i].next_send = run_start;
    now = run_start;
    if (opt.sink_rate > 0) {
        throttle_sink = 1;
        conn_events(sink);
    }

    while (!error && !stop_flag) {
        int sending = now < win_end;
        if (!sending) {
            uint64_t sent = 0, recv = 0;
            for (int i = 0; i < ns; i++) {
                sent += conns[i].sent;
                recv += rx[i].recv_total;
            }
            if (now >= drain_end || recv >= sent) break;
        }
        if (sink->state != ST_OPEN) {
            error = "the sink was disconnected";
            break;
        }
        int busy = 0; /* some sender could write more right now */
        uint64_t wake = sending ? win_end : drain_end;
        for (int i = 0; i < ns && sending; i++) {
            struct conn *c = &conns[i];
            if (c->state != ST_OPEN) continue;
            uint64_t n = 0;
            if (opt.window > 0) {
                if (rx[i].recv_total != last_recv) {
                    last_recv = rx[i].recv_total;
                    last_progress = now;
                }
                uint64_t acked = rx[i].recv_total + forgiven;
                uint64_t inflight = c->sent > acked ? c->sent - acked : 0;
                if (inflight >= (uint64_t)opt.window) {
                    if (now - last_progress > (uint64_t)(opt.stall * 1e9)) {
                        forgiven += inflight; /* presumed lost: do not wait for them forever */
                        stalls++;
                        last_progress = now;
                        n = (uint64_t)opt.window;
                    }
                } else {
                    n = (uint64_t)opt.window - inflight;
                    if (!inflight) last_progress = now;
                }
                if (interval) {
                    uint64_t due = now >= c->next_send ? (now - c->next_send) / interval + 1 : 0;
                    if (due < n) n = due;
                }
            } else if (interval) {
                if (now >= c->next_send) n = (now - c->next_send) / interval + 1;
                if (n > burst) n = burst;
            } else if (!c->blocked && buf_used(&c->out) < SENDER_HIGH) {
                size_t wire = (size_t)opt.size + 8;
                n = (SENDER_HIGH - buf_used(&c->out)) / wire + 1;
            }
            if (interval) {
                if (n) c->next_send += n * interval;
                if (c->next_send + 10000000ull < now) c->next_send = now; /* no catching up */
                if (c->next_send < wake) wake = c->next_send;
            }
            if (n) {
                gen_frames(c, n, now);
                conn_flush(c, now);
            }
            if (!interval && opt.window <= 0 && !c->blocked) busy = 1;
        }
        if (opt.sink_rate > 0) {
            /* The slow reader: a token bucket in frames, refilled every millisecond. */
            tokens += opt.sink_rate * secs(now - sink_tokens_ns);
            sink_tokens_ns = now;
            double cap = opt.sink_rate * 0.005 + 1;
            if (tokens > cap) tokens = cap;
            size_t wire = (size_t)opt.size + (opt.size < 126 ? 2 : 4);
            if (tokens >= 1) tokens -= (double)conn_read(sink, (size_t)tokens * wire, &now);
            if (now + 1000000 < wake) wake = now + 1000000;
        }
        int timeout = 0;
        if (!busy) {
            uint64_t w = wake > now ? wake - now : 0;
            if (opt.window > 0 && w > 1000000) w = 1000000; /* stall checks */
            timeout = (int)((w + 999999) / 1000000);
            if (timeout > 200) timeout = 200;
        }
        poll_once(timeout, &now);
    }
    uint64_t t_end = now_ns();

    uint64_t sent = 0, sent_win = 0, recv = 0, recv_win = 0, gaps = 0, gap_frames = 0, regr = 0;
    double sum = 0, sumsq = 0;
    for (int i = 0; i < ns; i++) {
        sent += conns[i].sent;
        sent_win += conns[i].sent_win;
        recv += rx[i].recv_total;
        recv_win += rx[i].recv_win;
        gaps += rx[i].gaps;
        gap_frames += rx[i].gap_frames;
        regr += rx[i].regressions;
        sum += (double)rx[i].recv_win;
        sumsq += (double)rx[i].recv_win * (double)rx[i].recv_win;
    }
    double jain = sumsq > 0 ? sum * sum / (ns * sumsq) : 0;
    int starved = 0;
    /* Starved: under 1 % of the fair share of what was delivered (all, if nothing was). */
    for (int i = 0; i < ns; i++) starved += sum == 0 || (double)rx[i].recv_win < 0.01 * sum / ns;
    double fps = recv_win / opt.duration;
    uint64_t other = 0, pings = 0;
    for (int i = 0; i <= ns; i++) {
        other += conns[i].other_frames;
        pings += conns[i].pings;
    }

    printf("{\"mode\":\"%s\",\"ok\":%s,\"error\":", opt.mode, error ? "false" : "true");
    if (error) printf("\"%s\"", error);
    else printf("null");
    printf(",\"size\":%d,\"window\":%d,\"senders\":%d,\"rate\":%.0f,\"sink_rate\":%.0f,"
           "\"duration_s\":%.3f,\"warmup_s\":%.3f,",
           opt.size, opt.window, ns, opt.rate, opt.sink_rate, opt.duration, opt.warmup);
    printf("\"sent\":%llu,\"sent_in_window\":%llu,\"received\":%llu,\"received_in_window\":%llu,",
           (unsigned long long)sent, (unsigned long long)sent_win, (unsigned long long)recv,
           (unsigned long long)recv_win);
    printf("\"frames_per_s\":%.1f,\"mbit_per_s\":%.2f,\"loss_in_window\":%lld,\"loss_ratio\":%.6f,",
           fps, fps * opt.size * 8 / 1e6, (long long)sent_win - (long long)recv_win,
           sent_win ? 1.0 - (double)recv_win / (double)sent_win : 0.0);
    printf("\"gaps\":%llu,\"gap_frames\":%llu,\"regressions\":%llu,\"stalls\":%llu,",
           (unsigned long long)gaps, (unsigned long long)gap_frames, (unsigned long long)regr,
           (unsigned long long)stalls);
    printf("\"latency_us\":{\"count\":%llu,\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,\"max\":%.1f},",
           (unsigned long long)hist_count, hist_pct_us(0.50), hist_pct_us(0.90),
           hist_pct_us(0.99), hist_max / 1000.0);
    printf("\"jain\":%.4f,\"starved\":%d,\"per_sender\":[", jain, starved);
    for (int i = 0; i < ns; i++)
        printf("%s{\"sent\":%llu,\"sent_in_window\":%llu,\"delivered_in_window\":%llu}",
               i ? "," : "", (unsigned long long)conns[i].sent,
               (unsigned long long)conns[i].sent_win, (unsigned long long)rx[i].recv_win);
    printf("],\"other_frames\":%llu,\"pings\":%llu,\"elapsed_s\":%.3f,", (unsigned long long)other,
           (unsigned long long)pings, secs(t_end - t0));
    print_cpu();
    printf("}\n");
    return error ? 1 : 0;
}

/* ---- connect ------------------------------------------------------------------------------- */

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int run_connect(void)
{
    make_conns(opt.clients);
    uint64_t t0 = now_ns(), now = t0, deadline = t0 + (uint64_t)(opt.timeout * 1e9);
    /* --concurrency 0: every connect() before the event loop runs, so before any upgrade can
     * complete; K > 0: at most K connections between connect() and the end of their upgrade. */
    int limit = opt.concurrency > 0 ? opt.concurrency : nconns, started = 0;
    while (started < limit && started < nconns) conn_start(&conns[started++]);
    uint64_t t_issued = now_ns();
    int upgraded = 0, failed = 0;
    while (!stop_flag && now < deadline) {
        upgraded = failed = 0;
        for (int i = 0; i < started; i++) {
            upgraded += conns[i].t_upgraded != 0;
            failed += conns[i].state == ST_FAILED ||
                      (!conns[i].t_upgraded && conns[i].state >= ST_CLOSING);
        }
        if (upgraded + failed == nconns) break;
        if (started < nconns && started - upgraded - failed < limit) {
            while (started < nconns && started - upgraded - failed < limit)
                conn_start(&conns[started++]);
            continue;
        }
        poll_once(20, &now);
    }
    uint64_t *times = xmalloc(sizeof(uint64_t) * (size_t)(nconns + 1));
    int nt = 0, refused = 0, pending = 0;
    for (int i = 0; i < started; i++) {
        struct conn *c = &conns[i];
        if (c->t_upgraded) times[nt++] = c->t_upgraded - t0;
        else if (c->http_status && c->http_status != 101) refused++;
        else if (c->state < ST_OPEN) pending++;
    }
    qsort(times, (size_t)nt, sizeof *times, cmp_u64);
    fprintf(stderr, "UPGRADED %d %.1f\n", nt, nt ? times[nt - 1] / 1e6 : -1.0);
    fflush(stderr);

    /* Hold them idle until "close" on stdin (or EOF) or --hold seconds. */
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &e);
    uint64_t hold_end = now_ns() + (uint64_t)(opt.hold * 1e9);
    while (!stop_flag && now < hold_end) poll_once(100, &now);
    int open_after_hold = 0, pings = 0;
    for (int i = 0; i < nconns; i++) {
        open_after_hold += conns[i].state == ST_OPEN;
        pings += (int)conns[i].pings;
    }

    /* Close all; the server answers with its close frame and closes the TCP connection. */
    uint64_t tc = now_ns();
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->state != ST_OPEN) continue;
        uint8_t code[2] = {0x03, 0xE8}; /* 1000 */
        put_masked(c, OP_CLOSE, code, 2);
        c->sent_close = 1;
        c->state = ST_CLOSING;
        c->t_closed = 0;
        conn_flush(c, tc);
    }
    uint64_t close_deadline = tc + (uint64_t)(opt.close_timeout * 1e9);
    int closing = 1;
    now = tc;
    while (closing && now < close_deadline) {
        closing = 0;
        for (int i = 0; i < nconns; i++) closing += conns[i].state == ST_CLOSING;
        if (closing) poll_once(20, &now);
    }
    int closed_by_server = 0;
    uint64_t t_last_close = 0;
    for (int i = 0; i < nconns; i++) {
        struct conn *c = &conns[i];
        if (c->sent_close && c->state == ST_CLOSED && c->t_closed >= tc) {
            closed_by_server++;
            if (c->t_closed - tc > t_last_close) t_last_close = c->t_closed - tc;
        }
        if (c->fd >= 0) conn_end(c, ST_CLOSED, now);
    }

    printf("{\"mode\":\"connect\",\"ok\":%s,\"clients\":%d,\"upgraded\":%d,\"refused\":%d,"
           "\"failed\":%d,\"pending_at_timeout\":%d,\"not_started\":%d,\"concurrency\":%d,"
           "\"issue_ms\":%.2f,",
           nt == nconns ? "true" : "false", nconns, nt, refused, failed - refused, pending,
           nconns - started, opt.concurrency, (t_issued - t0) / 1e6);
    int marks[] = {1, 2, 5, 10, 30, 60};
    printf("\"upgraded_within_s\":{");
    for (int m = 0; m < 6; m++) {
        int k = 0;
        while (k < nt && times[k] <= (uint64_t)marks[m] * 1000000000ull) k++;
        printf("%s\"%d\":%d", m ? "," : "", marks[m], k);
    }
    printf("},\"upgrade_ms\":{\"first\":%.1f,\"p50\":%.1f,\"p90\":%.1f,\"last\":%.1f},",
           nt ? times[0] / 1e6 : -1.0, nt ? times[nt / 2] / 1e6 : -1.0,
           nt ? times[(nt * 9) / 10 < nt ? (nt * 9) / 10 : nt - 1] / 1e6 : -1.0,
           nt ? times[nt - 1] / 1e6 : -1.0);
    printf("\"open_after_hold\":%d,\"pings_answered\":%d,\"closed_by_server\":%d,"
           "\"close_all_ms\":%.1f,",
           open_after_hold, pings, closed_by_server,
           closed_by_server ? t_last_close / 1e6 : -1.0);
    print_cpu();
    printf("}\n");
    free(times);
    return nt == nconns ? 0 : 1;
}

/* ---- tap connector ----------------------------------------------------------------------- */

static int open_tap_in(const char *ns, const char *name, char *actual, uint8_t mac[6])
{
    char path[256];
    snprintf(path, sizeof path, "/run/netns/%s", ns);
    int nsfd = open(path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) die(path);
    /* One thread: from here on, new sockets and TAPs belong to the guest namespace; the
     * WebSocket already connected stays in the server's. */
    if (setns(nsfd, CLONE_NEWNET) < 0) die("setns");
    close(nsfd);
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) die("/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("TUNSETIFF");
    snprintf(actual, IFNAMSIZ, "%s", ifr.ifr_name);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ioctl(s, SIOCGIFHWADDR, &ifr) < 0) die("SIOCGIFHWADDR");
    close(s);
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    return fd;
}

static int run_tap(void)
{
    if (!opt.guest_ns) {
        fprintf(stderr, "tap mode needs --guest-ns\n");
        return 2;
    }
    make_conns(1);
    struct conn *c = &conns[0];
    c->role = ROLE_TAP;
    if (connect_all(now_ns() + CONNECT_TIMEOUT_NS) < 0) {
        printf("{\"mode\":\"tap\",\"ok\":false,\"error\":\"connect\"}\n");
        return 1;
    }
    char name[IFNAMSIZ];
    uint8_t mac[6];
    tap_fd = open_tap_in(opt.guest_ns, opt.tap, name, mac);
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = UINT32_MAX - 1};
    epoll_ctl(epfd, EPOLL_CTL_ADD, tap_fd, &e);
    printf("READY %s %02x:%02x:%02x:%02x:%02x:%02x\n", name, mac[0], mac[1], mac[2], mac[3],
           mac[4], mac[5]);
    fflush(stdout);
    static uint8_t frame[MAX_FRAME];
    uint64_t now = now_ns();
    while (!stop_flag && c->state == ST_OPEN) {
        struct epoll_event evs[8];
        int n = epoll_wait(epfd, evs, 8, 500);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 != UINT32_MAX - 1) {
                on_event(c, evs[i].events, &now);
                continue;
            }
            for (int k = 0; k < 64; k++) {
                ssize_t r = read(tap_fd, frame, sizeof frame);
                if (r <= 0) break;
                if (buf_used(&c->out) > TAP_OUT_LIMIT) {
                    tap_drop_backlog++; /* like a full NIC queue */
                    continue;
                }
                put_masked(c, OP_BINARY, frame, (size_t)r);
                tap_to_ws++;
            }
        }
        if (c->fd >= 0) conn_flush(c, now);
    }
    printf("{\"mode\":\"tap\",\"ok\":true,\"tap_to_ws\":%llu,\"ws_to_tap\":%llu,"
           "\"dropped_backlog\":%llu,\"dropped_tap_full\":%llu,\"closed_by_server\":%s}\n",
           (unsigned long long)tap_to_ws, (unsigned long long)ws_to_tap,
           (unsigned long long)tap_drop_backlog, (unsigned long long)tap_drop_full,
           c->state == ST_OPEN ? "false" : "true");
    return 0;
}

/* ---- main ---------------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen relay|overload|connect|tap --url ws://HOST:PORT/PATH [options]\n"
            "  --size B --window W --duration S --warmup S --drain S --stall S  (relay)\n"
            "  --senders N --rate FPS --sink-rate FPS --sink-rcvbuf BYTES       (overload)\n"
            "  --clients N --concurrency K --timeout S --hold S --close-timeout S (connect)\n"
            "  --guest-ns NAME --tap NAME                                       (tap)\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2) usage();
    opt.mode = argv[1];
    const char *url = "ws://127.0.0.1:8086/";
    if (!strcmp(opt.mode, "overload")) opt.window = 0, opt.senders = 8, opt.duration = 5;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--url")) url = v;
        else if (!strcmp(a, "--size")) opt.size = atoi(v);
        else if (!strcmp(a, "--window")) opt.window = atoi(v);
        else if (!strcmp(a, "--duration")) opt.duration = atof(v);
        else if (!strcmp(a, "--warmup")) opt.warmup = atof(v);
        else if (!strcmp(a, "--drain")) opt.drain = atof(v);
        else if (!strcmp(a, "--stall")) opt.stall = atof(v);
        else if (!strcmp(a, "--senders")) opt.senders = atoi(v);
        else if (!strcmp(a, "--rate")) opt.rate = atof(v);
        else if (!strcmp(a, "--sink-rate")) opt.sink_rate = atof(v);
        else if (!strcmp(a, "--sink-rcvbuf")) opt.sink_rcvbuf = atoi(v);
        else if (!strcmp(a, "--clients")) opt.clients = atoi(v);
        else if (!strcmp(a, "--concurrency")) opt.concurrency = atoi(v);
        else if (!strcmp(a, "--timeout")) opt.timeout = atof(v);
        else if (!strcmp(a, "--hold")) opt.hold = atof(v);
        else if (!strcmp(a, "--close-timeout")) opt.close_timeout = atof(v);
        else if (!strcmp(a, "--guest-ns")) opt.guest_ns = v;
        else if (!strcmp(a, "--tap")) opt.tap = v;
        else usage();
    }
    parse_url(url);
    if (opt.size < 60 || opt.size > MAX_FRAME || opt.senders < 1 || opt.senders > MAX_SENDERS ||
        opt.clients < 1 || opt.clients > 100000 || opt.duration <= 0 || opt.duration > 600 ||
        opt.hold < 0 || opt.hold > 3600 || opt.timeout <= 0 || opt.timeout > 600) {
        fprintf(stderr, "option out of range (size 60..65535, senders 1..%d, clients 1..100000,"
                        " durations bounded)\n", MAX_SENDERS);
        return 2;
    }
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max; /* connect mode holds one fd per client */
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (!strcmp(opt.mode, "relay")) {
        opt.senders = 1;
        return run_traffic();
    }
    if (!strcmp(opt.mode, "overload")) return run_traffic();
    if (!strcmp(opt.mode, "connect")) return run_connect();
    if (!strcmp(opt.mode, "tap")) return run_tap();
    usage();
    return 2;
}
