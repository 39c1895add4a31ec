/* Redis clients for bench_stall.py and bench_apps.py: a latency probe and a write load.
 *
 *   redis_probe probe PORT SECONDS KEYS   one GET key:<random below KEYS> at a time (the keys
 *                                         DEBUG POPULATE makes); every request's latency kept
 *   redis_probe bench PORT SECONDS KEYS DEPTH
 *                                         GET key:<random below KEYS>, pipelined DEPTH deep on
 *                                         one connection: throughput (every GET a hit, where
 *                                         redis-benchmark's 12-digit key names would all miss
 *                                         the keys DEBUG POPULATE makes)
 *   redis_probe churn PORT SECONDS KEYS RATE [LAG]
 *                                         eviction and refill: DEL RATE keys a second in
 *                                         DEBUG POPULATE's order, SET each back LAG (15) s
 *                                         later with its original value (0: KEYS/200 a second)
 *
 * Runs until SECONDS have passed or SIGTERM/SIGINT, then prints one JSON line. The probe's:
 * requests, p50/p99/p999/max latency in microseconds, the start (CLOCK_MONOTONIC seconds, the
 * clock of Python's time.monotonic) and latency of every request slower than 10 ms, and per
 * second the request count and the worst latency. A C client so that the probe's own jitter
 * (an interpreter's) does not pass for the server's stalls.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t next_rand(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(2); }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static char rbuf[1 << 20];
static size_t rlen, rpos;

static int fill(int fd) {
    if (rpos == rlen) rpos = rlen = 0;
    if (rpos > 0 && rlen - rpos < 4096) { memmove(rbuf, rbuf + rpos, rlen - rpos); rlen -= rpos; rpos = 0; }
    ssize_t n = read(fd, rbuf + rlen, sizeof rbuf - rlen);
    if (n <= 0) { if (n < 0 && errno == EINTR) return 0; fprintf(stderr, "redis closed\n"); exit(3); }
    rlen += n;
    return 1;
}

/* Consume one RESP reply of the kinds GET and SET give (+OK, $-1, $N data). */
static void read_reply(int fd) {
    for (;;) {
        char *start = rbuf + rpos, *end = memchr(start, '\n', rlen - rpos);
        if (!end) { fill(fd); continue; }
        if (*start == '$') {
            long n = atol(start + 1);
            size_t need = (end - start + 1) + (n >= 0 ? (size_t)n + 2 : 0);
            while (rlen - rpos < need) fill(fd);
            rpos += need;
        } else {
            rpos += end - start + 1;
        }
        return;
    }
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) { if (errno == EINTR) continue; perror("write"); exit(4); }
        p += w; n -= w;
    }
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static int probe(int port, double seconds, long keys) {
    int fd = connect_to(port);
    size_t cap = 1 << 20, n = 0;
    uint32_t *lat = malloc(cap * sizeof *lat);           /* microseconds, x10 for 0.1 us */
    int nsec = (int)seconds + 2;
    uint32_t *sec_n = calloc(nsec, 4), *sec_max = calloc(nsec, 4);
    double *slow_t = malloc(100000 * sizeof(double)); uint32_t *slow_l = malloc(100000 * 4);
    size_t nslow = 0;
    char cmd[128];
    double t0 = now(), t = t0;
    while (!stop && t - t0 < seconds) {
        unsigned long k = next_rand() % (unsigned long)keys;
        char key[32];
        int kl = snprintf(key, sizeof key, "key:%lu", k);
        int cl = snprintf(cmd, sizeof cmd, "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", kl, key);
        double a = now();
        write_all(fd, cmd, cl);
        read_reply(fd);
        t = now();
        uint32_t us10 = (uint32_t)((t - a) * 1e7);
        if (n == cap) { cap *= 2; lat = realloc(lat, cap * sizeof *lat); }
        lat[n++] = us10;
        int s = (int)(a - t0);
        if (s < nsec) { sec_n[s]++; if (us10 > sec_max[s]) sec_max[s] = us10; }
        if (us10 >= 100000 && nslow < 100000) { slow_t[nslow] = a; slow_l[nslow++] = us10; }
    }
    double elapsed = t - t0;
    if (n == 0) { printf("{\"requests\": 0}\n"); return 0; }
    qsort(lat, n, sizeof *lat, cmp_u32);
#define PCT(p) (lat[(size_t)((double)(n - 1) * (p))] / 10.0)
    printf("{\"requests\": %zu, \"seconds\": %.3f, \"t0\": %.6f, \"p50_us\": %.1f, "
           "\"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f, \"slow\": [",
           n, elapsed, t0, PCT(0.5), PCT(0.99), PCT(0.999), lat[n - 1] / 10.0);
    for (size_t i = 0; i < nslow; i++)
        printf("%s[%.6f, %.1f]", i ? ", " : "", slow_t[i], slow_l[i] / 10.0);
    printf("], \"per_second\": [");
    int last = (int)elapsed;
    for (int s = 0; s <= last && s < nsec; s++)
        printf("%s[%u, %.1f]", s ? ", " : "", sec_n[s], sec_max[s] / 10.0);
    printf("]}\n");
    return 0;
}

static int bench(int port, double seconds, long keys, int depth) {
    int fd = connect_to(port);
    static char buf[1 << 16];
    size_t ops = 0;
    if (depth < 1 || depth > 512) depth = 16;
    double t0 = now(), t = t0;
    while (!stop && t - t0 < seconds) {
        size_t len = 0;
        for (int i = 0; i < depth; i++) {
            unsigned long k = next_rand() % (unsigned long)keys;
            char key[32];
            int kl = snprintf(key, sizeof key, "key:%lu", k);
            len += snprintf(buf + len, sizeof buf - len, "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", kl, key);
        }
        write_all(fd, buf, len);
        for (int i = 0; i < depth; i++) read_reply(fd);
        ops += depth;
        t = now();
    }
    printf("{\"gets\": %zu, \"seconds\": %.3f, \"gets_per_s\": %.0f}\n", ops, t - t0, ops / (t - t0));
    return 0;
}

static int churn(int port, double seconds, long keys, double rate, double lag) {
    /* Cache-like eviction and refill: a cursor walks the key space in DEBUG POPULATE's order
     * (so what it frees lies together in memory) deleting RATE keys a second; the keys it
     * deleted LAG seconds earlier are SET back with the value DEBUG POPULATE gave them
     * ("value:N" padded with NULs to 1024 bytes). Memory stays about constant, and what was
     * freed stays free for LAG seconds, longer than jemalloc's 10 s dirty decay: it is purged,
     * which splits the huge pages it lies in. */
    int fd = connect_to(port);
    static char buf[1 << 18], value[1024];
    const int batch = 64;
    long del_cur = 0, set_cur = 0;
    size_t dels = 0, sets = 0;
    double t0 = now(), t = t0;
    if (rate <= 0) rate = keys / 200.0;
    while (!stop && t - t0 < seconds) {
        double el = t - t0;
        long want_del = (long)(el * rate) + batch, want_set = (long)((el - lag) * rate);
        if ((long)dels < want_del) {
            size_t len = snprintf(buf, sizeof buf, "*%d\r\n$3\r\nDEL\r\n", batch + 1);
            for (int i = 0; i < batch; i++) {
                char key[32];
                int kl = snprintf(key, sizeof key, "key:%ld", (del_cur + i) % keys);
                len += snprintf(buf + len, sizeof buf - len, "$%d\r\n%s\r\n", kl, key);
            }
            write_all(fd, buf, len);
            read_reply(fd);
            del_cur += batch; dels += batch;
        }
        if ((long)sets < want_set) {
            size_t len = 0;
            for (int i = 0; i < batch; i++) {
                long k = (set_cur + i) % keys;
                char key[32];
                int kl = snprintf(key, sizeof key, "key:%ld", k);
                memset(value, 0, sizeof value);
                snprintf(value, sizeof value, "value:%ld", k);
                len += snprintf(buf + len, sizeof buf - len,
                                "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1024\r\n", kl, key);
                memcpy(buf + len, value, 1024); len += 1024;
                memcpy(buf + len, "\r\n", 2); len += 2;
            }
            write_all(fd, buf, len);
            for (int i = 0; i < batch; i++) read_reply(fd);
            set_cur += batch; sets += batch;
        }
        if ((long)dels >= want_del && (long)sets >= want_set) {
            struct timespec ts = {0, 5000000};
            nanosleep(&ts, NULL);
        }
        t = now();
    }
    /* Put back every key still deleted, so that the contents are whole again. */
    while (set_cur < del_cur) {
        size_t len = 0;
        int n = 0;
        for (; n < batch && set_cur + n < del_cur; n++) {
            long k = (set_cur + n) % keys;
            char key[32];
            int kl = snprintf(key, sizeof key, "key:%ld", k);
            memset(value, 0, sizeof value);
            snprintf(value, sizeof value, "value:%ld", k);
            len += snprintf(buf + len, sizeof buf - len,
                            "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1024\r\n", kl, key);
            memcpy(buf + len, value, 1024); len += 1024;
            memcpy(buf + len, "\r\n", 2); len += 2;
        }
        write_all(fd, buf, len);
        for (int i = 0; i < n; i++) read_reply(fd);
        set_cur += n;
    }
    printf("{\"deleted\": %zu, \"set_back\": %zu, \"seconds\": %.3f, \"keys_per_s\": %.0f, "
           "\"lag_s\": %.1f}\n", dels, sets, t - t0, dels / (t - t0), lag);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s probe|bench|churn PORT SECONDS KEYS [RATE]\n", argv[0]); return 1; }
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    rng ^= (uint64_t)getpid() << 20;
    int port = atoi(argv[2]);
    double seconds = atof(argv[3]);
    long keys = atol(argv[4]);
    if (keys <= 0) { fprintf(stderr, "KEYS must be > 0\n"); return 1; }
    if (!strcmp(argv[1], "probe")) return probe(port, seconds, keys);
    if (!strcmp(argv[1], "bench")) return bench(port, seconds, keys, argc > 5 ? atoi(argv[5]) : 16);
    if (!strcmp(argv[1], "churn"))
        return churn(port, seconds, keys, argc > 5 ? atof(argv[5]) : 0, argc > 6 ? atof(argv[6]) : 15);
    fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 1;
}
