/* The flow-event benchmark's sender: one new denied TCP flow per BPF_PROG_TEST_RUN call,
 * paced to a rate. In C so that generating the load costs the machine little next to what is
 * measured (the pipeline, the broker, the consumer share its cores).
 *
 * usage: evgen PROG_FD FRAME_HEX RATE SECONDS FIRST SRC_OFFSET SRC_BASE
 *   PROG_FD     an fd of the classifier's ingress program, inherited
 *   FRAME_HEX   the Ethernet frame, hex; its IPv4 source (at SRC_OFFSET) becomes
 *               SRC_BASE + FIRST + i for the i-th packet, so every packet is a new flow
 * prints: "sent elapsed_s failed_calls not_denied"; gives up after 3 x SECONDS + 1 s.
 */
#include <arpa/inet.h>
#include <linux/bpf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TC_ACT_SHOT 2

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    unsigned char frame[512], out[1024];
    if (argc != 8) {
        fprintf(stderr, "usage: evgen PROG_FD FRAME_HEX RATE SECONDS FIRST SRC_OFFSET SRC_BASE\n");
        return 2;
    }
    int fd = atoi(argv[1]);
    size_t n = strlen(argv[2]) / 2;
    int off = atoi(argv[6]);
    if (n == 0 || n > sizeof frame || off < 0 || (size_t)off + 4 > n) {
        fprintf(stderr, "evgen: bad frame or offset\n");
        return 2;
    }
    for (size_t i = 0; i < n; i++)
        if (sscanf(argv[2] + 2 * i, "%2hhx", &frame[i]) != 1) {
            fprintf(stderr, "evgen: FRAME_HEX is not hex\n");
            return 2;
        }
    double rate = atof(argv[3]), seconds = atof(argv[4]);
    unsigned long first = strtoul(argv[5], NULL, 10);
    unsigned long base = strtoul(argv[7], NULL, 10);
    if (rate <= 0 || seconds <= 0) {
        fprintf(stderr, "evgen: RATE and SECONDS must be positive\n");
        return 2;
    }
    unsigned long total = (unsigned long)(rate * seconds), i = 0, failed = 0, other = 0;
    double t0 = now(), deadline = t0 + 3 * seconds + 1;
    union bpf_attr a;
    while (i < total) {
        double t = now();
        if (t > deadline)
            break;
        unsigned long due = (unsigned long)((t - t0) * rate) + 1;
        if (due > total)
            due = total;
        if (due <= i) {
            struct timespec pause = {0, 100000};
            nanosleep(&pause, NULL);
            continue;
        }
        for (; i < due; i++) {
            uint32_t src = htonl((uint32_t)(base + first + i));
            memcpy(frame + off, &src, 4);
            memset(&a, 0, sizeof a);
            a.test.prog_fd = fd;
            a.test.data_in = (uint64_t)(uintptr_t)frame;
            a.test.data_size_in = n;
            a.test.data_out = (uint64_t)(uintptr_t)out;
            a.test.data_size_out = sizeof out;
            a.test.repeat = 1;
            if (syscall(__NR_bpf, BPF_PROG_TEST_RUN, &a, sizeof a) != 0)
                failed++;
            else if (a.test.retval != TC_ACT_SHOT)
                other++;
        }
    }
    printf("%lu %.6f %lu %lu\n", i, now() - t0, failed, other);
    return 0;
}
