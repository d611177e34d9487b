/* nettool: the bench's small traffic tool (netperf's TCP_RR / TCP_CRR and a UDP flood).
 *
 *   nettool echo   ADDR PORT SECONDS        TCP server: echo every byte until the peer closes
 *   nettool sink   ADDR PORT SECONDS        UDP sink: count datagrams, print JSON at the end
 *   nettool rr     ADDR PORT SECONDS SIZE   one connection, SIZE-byte request/response loop
 *   nettool crr    ADDR PORT SECONDS        a new connection per 1-byte request/response
 *   nettool udp    ADDR PORT SECONDS SIZE   send SIZE-byte datagrams as fast as possible
 *   nettool udpab  NETNS_A ADDR_A NETNS_B ADDR_B PORT SECONDS SIZE SLICE_MS
 *                  the same flood from two network namespaces (paths of their netns files)
 *                  in turn, SLICE_MS each, for SECONDS in all: the time and datagrams sent
 *                  to each, so a machine's drift (other tenants, clocks) hits both alike
 *   nettool rrab   NETNS_A ADDR_A NETNS_B ADDR_B PORT SECONDS SIZE
 *                  `rr` over one connection into each namespace, transactions alternating
 *                  A, B, A, B for SECONDS in all: the latencies of each, so a stall of the
 *                  machine lands in both tails alike
 *
 * Clients print one JSON object on stdout. Every mode stops by itself after SECONDS (the
 * servers after SECONDS + a grace), every blocking call has a 1 s timeout, so nothing runs
 * unbounded. Latencies are kept per transaction (up to MAX_SAMPLES) for exact p50/p99.
 * Build: cc -O2 -o nettool nettool.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SAMPLES (8u << 20)
#define MAX_CONNS 1024
#define BATCH 64

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "nettool: %s: %s\n", what, strerror(errno));
    exit(1);
}

static socklen_t make_addr(const char *text, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, text, &a4->sin_addr) == 1) {
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        return sizeof(*a4);
    }
    if (inet_pton(AF_INET6, text, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        return sizeof(*a6);
    }
    fprintf(stderr, "nettool: not an IP address: %s\n", text);
    exit(2);
}

static void timeouts(int fd) {
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The fields of a latency result (no braces): count, errors, rate, p50/p99/mean in µs. */
static void latency_fields(uint64_t n, uint64_t errors, double secs, uint64_t *lat,
                           uint64_t kept) {
    double p50 = 0, p99 = 0, mean = 0;
    if (kept) {
        qsort(lat, kept, sizeof(*lat), cmp_u64);
        p50 = lat[kept / 2] / 1e3;
        p99 = lat[(kept * 99) / 100] / 1e3;
        double sum = 0;
        for (uint64_t i = 0; i < kept; i++) sum += lat[i];
        mean = sum / kept / 1e3;
    }
    printf("\"count\":%llu,\"errors\":%llu,\"seconds\":%.6f,\"rate\":%.1f,"
           "\"p50_us\":%.2f,\"p99_us\":%.2f,\"mean_us\":%.2f",
           (unsigned long long)n, (unsigned long long)errors, secs, secs > 0 ? n / secs : 0.0,
           p50, p99, mean);
}

static void print_latency(const char *mode, uint64_t n, uint64_t errors, double secs,
                          uint64_t *lat, uint64_t kept) {
    printf("{\"mode\":\"%s\",", mode);
    latency_fields(n, errors, secs, lat, kept);
    printf("}\n");
}

static int listener(const char *addr, int port, int type) {
    struct sockaddr_storage ss;
    socklen_t len = make_addr(addr, port, &ss);
    int fd = socket(ss.ss_family, type, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (type == SOCK_DGRAM) {
        int big = 8 << 20;
        setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    }
    if (bind(fd, (struct sockaddr *)&ss, len) < 0) die("bind");
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) die("listen");
    return fd;
}

/* A poll loop: accept, echo, close on EOF or error. */
static int echo_server(const char *addr, int port, double secs) {
    int lfd = listener(addr, port, SOCK_STREAM);
    struct pollfd fds[MAX_CONNS + 1];
    int n = 1;
    fds[0].fd = lfd;
    fds[0].events = POLLIN;
    char buf[65536];
    uint64_t end = now_ns() + (uint64_t)(secs * 1e9);
    printf("ready\n");
    fflush(stdout);
    while (now_ns() < end) {
        if (poll(fds, (nfds_t)n, 200) < 0 && errno != EINTR) die("poll");
        if ((fds[0].revents & POLLIN) && n <= MAX_CONNS) {
            int c = accept(lfd, NULL, NULL);
            if (c >= 0) {
                int one = 1;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                timeouts(c);
                fds[n].fd = c;
                fds[n].events = POLLIN;
                fds[n].revents = 0;
                n++;
            }
        }
        for (int i = 1; i < n; i++) {
            if (!fds[i].revents) continue;
            ssize_t got = recv(fds[i].fd, buf, sizeof(buf), MSG_DONTWAIT);
            if (got > 0 && send(fds[i].fd, buf, (size_t)got, MSG_NOSIGNAL) == got) continue;
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            close(fds[i].fd);
            fds[i] = fds[--n];
            i--;
        }
    }
    return 0;
}

static int udp_sink(const char *addr, int port, double secs) {
    int fd = listener(addr, port, SOCK_DGRAM);
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    static char bufs[BATCH][2048];
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof(bufs[i]);
        memset(&msgs[i], 0, sizeof(msgs[i]));
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct timeval tv = {0, 100000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    uint64_t count = 0, first = 0, last = 0, end = now_ns() + (uint64_t)(secs * 1e9);
    printf("ready\n");
    fflush(stdout);
    while (now_ns() < end) {
        int got = recvmmsg(fd, msgs, BATCH, 0, NULL);
        if (got <= 0) {
            /* Quiet for 100 ms after traffic: the sender is done. */
            if (count && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
            continue;
        }
        uint64_t t = now_ns();
        if (!count) first = t;
        last = t;
        count += (uint64_t)got;
    }
    double span = count > 1 ? (last - first) / 1e9 : 0;
    printf("{\"mode\":\"sink\",\"count\":%llu,\"seconds\":%.6f,\"rate\":%.1f}\n",
           (unsigned long long)count, span, span > 0 ? count / span : 0.0);
    return 0;
}

static int connect_to(const char *addr, int port) {
    struct sockaddr_storage ss;
    socklen_t len = make_addr(addr, port, &ss);
    int fd = socket(ss.ss_family, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    timeouts(fd);
    if (connect(fd, (struct sockaddr *)&ss, len) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int exchange(int fd, char *buf, size_t size) {
    if (send(fd, buf, size, MSG_NOSIGNAL) != (ssize_t)size) return -1;
    size_t got = 0;
    while (got < size) {
        ssize_t r = recv(fd, buf + got, size - got, 0);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

static int rr_client(const char *addr, int port, double secs, size_t size, int crr) {
    uint64_t *lat = malloc(MAX_SAMPLES * sizeof(*lat));
    char *buf = calloc(1, size);
    if (!lat || !buf) die("malloc");
    uint64_t n = 0, errors = 0, kept = 0;
    int fd = crr ? -1 : connect_to(addr, port);
    if (!crr && fd < 0) die("connect");
    struct linger lg = {1, 0};
    uint64_t start = now_ns(), end = start + (uint64_t)(secs * 1e9), t = start;
    while (t < end && errors < 1000) {
        uint64_t t0 = t;
        if (crr) {
            fd = connect_to(addr, port);
            if (fd < 0) {
                errors++;
                t = now_ns();
                continue;
            }
        }
        int bad = exchange(fd, buf, size);
        if (crr) {
            /* RST instead of FIN: no TIME_WAIT, so ports never run out in a long run. */
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
            close(fd);
        }
        t = now_ns();
        if (bad) {
            errors++;
            if (!crr) break;
            continue;
        }
        n++;
        if (kept < MAX_SAMPLES) lat[kept++] = t - t0;
    }
    if (!crr) close(fd);
    print_latency(crr ? "crr" : "rr", n, errors, (t - start) / 1e9, lat, kept);
    return 0;
}

/* A UDP socket connected to ADDR:PORT with `msgs` ready to send SIZE-byte datagrams. */
static int udp_sender(const char *addr, int port, size_t size, struct mmsghdr *msgs,
                      struct iovec *iov) {
    struct sockaddr_storage ss;
    socklen_t len = make_addr(addr, port, &ss);
    int fd = socket(ss.ss_family, SOCK_DGRAM, 0);
    if (fd < 0) die("socket");
    if (connect(fd, (struct sockaddr *)&ss, len) < 0) die("connect");
    timeouts(fd);
    char *buf = calloc(1, size);
    if (!buf) die("malloc");
    iov->iov_base = buf;
    iov->iov_len = size;
    for (int i = 0; i < BATCH; i++) {
        memset(&msgs[i], 0, sizeof(msgs[i]));
        msgs[i].msg_hdr.msg_iov = iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    return fd;
}

static int udp_client(const char *addr, int port, double secs, size_t size) {
    struct mmsghdr msgs[BATCH];
    struct iovec iov;
    int fd = udp_sender(addr, port, size, msgs, &iov);
    uint64_t sent = 0, errors = 0, start = now_ns(), end = start + (uint64_t)(secs * 1e9);
    uint64_t t = start;
    while (t < end) {
        int r = sendmmsg(fd, msgs, BATCH, 0);
        if (r > 0)
            sent += (uint64_t)r;
        else
            errors++;
        t = now_ns();
    }
    double span = (t - start) / 1e9;
    printf("{\"mode\":\"udp\",\"count\":%llu,\"errors\":%llu,\"seconds\":%.6f,\"rate\":%.1f}\n",
           (unsigned long long)sent, (unsigned long long)errors, span, sent / span);
    return 0;
}

/* Into the network namespace at `path`: sockets made from now on belong to it. */
static void enter_netns(const char *path) {
    int nsfd = open(path, O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) die(path);
    if (setns(nsfd, CLONE_NEWNET) < 0) die("setns");
    close(nsfd);
}

/* The flood of `udp` from two network namespaces in turn (this process enters each to make
 * its socket; a socket stays in the namespace it was made in). */
static int udp_ab(char **argv) {
    const char *ns[2] = {argv[2], argv[4]}, *addr[2] = {argv[3], argv[5]};
    int port = atoi(argv[6]);
    double secs = atof(argv[7]);
    int size = atoi(argv[8]), slice_ms = atoi(argv[9]);
    if (port <= 0 || port > 65535 || secs <= 0 || secs > 3600 || size < 1 || size > 65536 ||
        slice_ms < 1 || slice_ms > 10000) {
        fprintf(stderr, "nettool: bad port, seconds, size or slice\n");
        return 2;
    }
    static struct mmsghdr msgs[2][BATCH];
    struct iovec iov[2];
    int fd[2];
    for (int i = 0; i < 2; i++) {
        enter_netns(ns[i]);
        fd[i] = udp_sender(addr[i], port, (size_t)size, msgs[i], &iov[i]);
    }
    uint64_t sent[2] = {0, 0}, errors[2] = {0, 0}, spent[2] = {0, 0};
    uint64_t start = now_ns(), end = start + (uint64_t)(secs * 1e9), t = start;
    uint64_t slice = (uint64_t)slice_ms * 1000000ull;
    for (int k = 0; t < end; k ^= 1) {
        uint64_t t0 = t, stop = t0 + slice < end ? t0 + slice : end;
        while (t < stop) {
            int r = sendmmsg(fd[k], msgs[k], BATCH, 0);
            if (r > 0)
                sent[k] += (uint64_t)r;
            else
                errors[k]++;
            t = now_ns();
        }
        spent[k] += t - t0;
    }
    printf("{\"mode\":\"udpab\"");
    for (int i = 0; i < 2; i++) {
        double s = spent[i] / 1e9;
        printf(",\"%c\":{\"count\":%llu,\"errors\":%llu,\"seconds\":%.6f,\"rate\":%.1f}",
               'a' + i, (unsigned long long)sent[i], (unsigned long long)errors[i], s,
               s > 0 ? sent[i] / s : 0.0);
    }
    printf("}\n");
    return 0;
}

/* `rr` into two network namespaces, one transaction each in turn. */
static int rr_ab(char **argv) {
    const char *ns[2] = {argv[2], argv[4]}, *addr[2] = {argv[3], argv[5]};
    int port = atoi(argv[6]);
    double secs = atof(argv[7]);
    int size = atoi(argv[8]);
    if (port <= 0 || port > 65535 || secs <= 0 || secs > 3600 || size < 1 || size > 65536) {
        fprintf(stderr, "nettool: bad port, seconds or size\n");
        return 2;
    }
    uint64_t *lat[2], n[2] = {0, 0}, errors[2] = {0, 0}, spent[2] = {0, 0};
    int fd[2];
    char *buf = calloc(1, (size_t)size);
    if (!buf) die("malloc");
    for (int i = 0; i < 2; i++) {
        lat[i] = malloc(MAX_SAMPLES / 2 * sizeof(uint64_t));
        if (!lat[i]) die("malloc");
        enter_netns(ns[i]);
        fd[i] = connect_to(addr[i], port);
        if (fd[i] < 0) die("connect");
    }
    uint64_t start = now_ns(), end = start + (uint64_t)(secs * 1e9), t = start;
    for (int k = 0; t < end; k ^= 1) {
        uint64_t t0 = t;
        int bad = exchange(fd[k], buf, (size_t)size);
        t = now_ns();
        spent[k] += t - t0;
        if (bad) {
            errors[k]++;
            break;  /* the connection is gone: the other side's samples stay paired */
        }
        if (n[k] < MAX_SAMPLES / 2) lat[k][n[k]] = t - t0;
        n[k]++;
    }
    printf("{\"mode\":\"rrab\"");
    for (int i = 0; i < 2; i++) {
        printf(",\"%c\":{", 'a' + i);
        latency_fields(n[i], errors[i], spent[i] / 1e9, lat[i],
                       n[i] < MAX_SAMPLES / 2 ? n[i] : MAX_SAMPLES / 2);
        printf("}");
        close(fd[i]);
    }
    printf("}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 10 && !strcmp(argv[1], "udpab")) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        return udp_ab(argv);
    }
    if (argc == 9 && !strcmp(argv[1], "rrab")) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        return rr_ab(argv);
    }
    if (argc < 5) {
        fprintf(stderr, "usage: nettool echo|sink|rr|crr|udp ADDR PORT SECONDS [SIZE]\n"
                        "       nettool udpab NETNS_A ADDR_A NETNS_B ADDR_B PORT SECONDS SIZE SLICE_MS\n"
                        "       nettool rrab NETNS_A ADDR_A NETNS_B ADDR_B PORT SECONDS SIZE\n");
        return 2;
    }
    const char *mode = argv[1], *addr = argv[2];
    int port = atoi(argv[3]);
    double secs = atof(argv[4]);
    size_t size = argc > 5 ? (size_t)atoi(argv[5]) : 1;
    if (port <= 0 || port > 65535 || secs <= 0 || secs > 3600 || size < 1 || size > 65536) {
        fprintf(stderr, "nettool: bad port, seconds (0..3600] or size (1..65536)\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "echo")) return echo_server(addr, port, secs);
    if (!strcmp(mode, "sink")) return udp_sink(addr, port, secs);
    if (!strcmp(mode, "rr")) return rr_client(addr, port, secs, size, 0);
    if (!strcmp(mode, "crr")) return rr_client(addr, port, secs, 1, 1);
    if (!strcmp(mode, "udp")) return udp_client(addr, port, secs, size);
    fprintf(stderr, "nettool: unknown mode %s\n", mode);
    return 2;
}
