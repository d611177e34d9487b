/* microseg: the TC classifier. Compiled at run time by bcc (streamer/datapath.py).
 *
 * Per packet: parse (Ethernet, VLAN/QinQ, IPv4 with options, IPv6 with extension headers,
 * TCP/UDP/ICMP/ICMPv6), find the flow's session (both directions share one entry), and on a
 * miss or after a policy change judge the flow by the tuple-space search below. DENY drops;
 * DENY and LOG flows put events on the ring buffer (first packet, then at most one per flow
 * per interval). What cannot be parsed far enough to judge is dropped and counted.
 *
 * Why tuple-space search: the policy model allows CIDRs of any length on both addresses,
 * port ranges and wildcards, so no single exact-match or LPM lookup can answer it. Rules that
 * share their masks (a "shape") live in one hash table keyed by the masked fields; a packet
 * probes one hash per shape, so the cost follows the number of distinct shapes, not rules.
 * Shapes are probed best-first (by the highest score they hold) and probing stops as soon as
 * no remaining shape can beat the match in hand. Port ranges are split into prefix-aligned
 * blocks by the compiler (streamer/compiler.py) so they fit masks too. bcc cannot relocate
 * bpf_loop callbacks, so the probe loop is a verifier-bounded loop over MS_MAX_SHAPES.
 *
 * Atomic policy changes: rules and shapes exist in two banks; userspace fills the idle bank,
 * then flips `active` (generation << 1 | bank) in a single 8-byte write. A packet reads it once,
 * so it is judged by one whole set. Sessions remember their generation and are judged again, in
 * their original direction, at their next packet after a flip.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include "classifier.h"

#ifndef MS_PIN
#error "MS_PIN (the pin directory) must be defined"
#endif
#ifndef MS_MAX_SHAPES
#define MS_MAX_SHAPES 512
#endif
#ifndef MS_SESSIONS
#define MS_SESSIONS 262144
#endif
#ifndef MS_RULE_ENTRIES
#define MS_RULE_ENTRIES 1048576
#endif
#ifndef MS_RULE_SLOTS
#define MS_RULE_SLOTS 200002
#endif
#ifndef MS_RINGBUF_PAGES
#define MS_RINGBUF_PAGES 256
#endif

#define MS_MAX_VLANS 2
#define MS_MAX_EXTHDRS 8
/* L4 headers further in than this are not looked for: the packet is dropped as unparsable. */
#define MS_MAX_L4_OFF 1024
#define MS_PULL_LEN 1100

#define PARSE_OK 255
#define PARSE_NEED_PULL 254

BPF_TABLE_PINNED("lru_hash", struct ms_sess_key, struct ms_sess_val, sessions, MS_SESSIONS,
                 MS_PIN "/sessions");
BPF_TABLE_PINNED("hash", struct ms_rule_key4, struct ms_rule_val, rules4, MS_RULE_ENTRIES,
                 MS_PIN "/rules4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct ms_rule_key6, struct ms_rule_val, rules6, MS_RULE_ENTRIES,
                 MS_PIN "/rules6", BPF_F_NO_PREALLOC);
/* index: (bank * 2 + (family == 6)) * MS_MAX_SHAPES + shape */
BPF_TABLE_PINNED("array", u32, struct ms_shape, shapes, 4 * MS_MAX_SHAPES, MS_PIN "/shapes");
BPF_TABLE_PINNED("array", u32, struct ms_bank, banks, 2, MS_PIN "/banks");
BPF_TABLE_PINNED("array", u32, u64, blooms, 2 * MS_BLOOM_BANK_WORDS, MS_PIN "/blooms");
BPF_TABLE_PINNED("array", u32, u64, active, 1, MS_PIN "/active");
BPF_TABLE_PINNED("array", u32, struct ms_settings, settings, 1, MS_PIN "/settings");
BPF_TABLE_PINNED("percpu_array", u32, struct ms_counters, counters, 1, MS_PIN "/counters");
BPF_TABLE_PINNED("percpu_array", u32, struct ms_rule_ctr, rule_stats, MS_RULE_SLOTS,
                 MS_PIN "/rule_stats");
BPF_RINGBUF_OUTPUT(events, MS_RINGBUF_PAGES);

/* Updating a map-of-maps waits for every running BPF program to finish (the kernel calls
 * synchronize_rcu), which lets userspace know no packet still reads the bank it just retired. */
BPF_ARRAY(barrier_inner, u32, 1);
BPF_ARRAY_OF_MAPS(barrier, "barrier_inner", 1);

struct ms_pkt {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport; /* network byte order; ICMP echo: the identifier */
    __u16 dport;
    __u8 family;
    __u8 proto;
    __u8 tcp_flags;
    __u8 dir;
};

/* What the fast path hands the slow path across the tail call. Per CPU: a TC program runs to
 * completion on its CPU, so the entry cannot be overwritten between the two halves. */
struct ms_scratch {
    struct ms_rule_val rv; /* the judge's result */
    struct ms_pkt p;
    struct ms_sess_key key;
    __u32 len;
    __u8 src_is_a;
    __u8 pad[3];
};
BPF_PERCPU_ARRAY(scratch, struct ms_scratch, 1);
/* Pinned: an unpinned program array is emptied when its last file descriptor closes, which
 * would leave the filters of a dead agent unable to judge new flows. */
BPF_TABLE_PINNED("prog", int, int, slow_path, 1, MS_PIN "/slow_path");

/* L4 header at data+off: ports, flags, or a verdict (PASS_L2 for neighbour discovery). */
static __always_inline int parse_l4(void *data, void *data_end, __u32 off, struct ms_pkt *p)
{
    if (off > MS_MAX_L4_OFF)
        return MS_DROP_PARSE;
    __u8 *l4 = data + off;
    switch (p->proto) {
    case IPPROTO_TCP:
        if ((void *)(l4 + 20) > data_end)
            return PARSE_NEED_PULL;
        p->sport = *(__u16 *)l4;
        p->dport = *(__u16 *)(l4 + 2);
        p->tcp_flags = l4[13];
        return PARSE_OK;
    case IPPROTO_UDP:
        if ((void *)(l4 + 8) > data_end)
            return PARSE_NEED_PULL;
        p->sport = *(__u16 *)l4;
        p->dport = *(__u16 *)(l4 + 2);
        return PARSE_OK;
    case IPPROTO_ICMP:
        /* ICMP inside IPv6, or ICMPv6 inside IPv4, is just another protocol: no echo ports,
         * and above all no neighbour-discovery pass for a forged IPv4 "ICMPv6" packet. */
        if (p->family != 4)
            return PARSE_OK;
        if ((void *)(l4 + 8) > data_end)
            return PARSE_NEED_PULL;
        if (l4[0] == 8 || l4[0] == 0) { /* echo request / reply share the identifier */
            p->sport = *(__u16 *)(l4 + 4);
            p->dport = p->sport;
        }
        return PARSE_OK;
    case IPPROTO_ICMPV6:
        if (p->family != 6)
            return PARSE_OK;
        if ((void *)(l4 + 8) > data_end)
            return PARSE_NEED_PULL;
        if (l4[0] >= 133 && l4[0] <= 137) /* RS, RA, NS, NA, redirect */
            return MS_PASS_L2;
        if (l4[0] == 128 || l4[0] == 129) {
            p->sport = *(__u16 *)(l4 + 4);
            p->dport = p->sport;
        }
        return PARSE_OK;
    default:
        return PARSE_OK;
    }
}

static __always_inline int parse(struct __sk_buff *skb, struct ms_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    __u32 off = sizeof(struct ethhdr);
    if ((void *)(eth + 1) > data_end)
        return PARSE_NEED_PULL;
    __u16 proto = eth->h_proto;

#pragma unroll
    for (int i = 0; i < MS_MAX_VLANS + 1; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
            break;
        if (i == MS_MAX_VLANS)
            return MS_DROP_PARSE;
        if (data + off + 4 > data_end)
            return PARSE_NEED_PULL;
        proto = *(__u16 *)(data + off + 2);
        off += 4;
    }

    if (proto == bpf_htons(ETH_P_ARP))
        return MS_PASS_L2;

    if (proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > data_end)
            return PARSE_NEED_PULL;
        if (ip->version != 4 || ip->ihl < 5)
            return MS_DROP_PARSE;
        __u32 hlen = ip->ihl * 4;
        if (data + off + hlen > data_end)
            return PARSE_NEED_PULL;
        if (bpf_ntohs(ip->tot_len) < hlen)
            return MS_DROP_PARSE;
        if (ip->frag_off & bpf_htons(0x1FFF))
            return MS_DROP_FRAGMENT;
        p->family = 4;
        p->proto = ip->protocol;
        p->src[0] = ip->saddr;
        p->dst[0] = ip->daddr;
        return parse_l4(data, data_end, off + hlen, p);
    }

    if (proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end)
            return PARSE_NEED_PULL;
        if (ip6->version != 6)
            return MS_DROP_PARSE;
        p->family = 6;
        __builtin_memcpy(p->src, &ip6->saddr, 16);
        __builtin_memcpy(p->dst, &ip6->daddr, 16);
        __u8 nh = ip6->nexthdr;
        off += sizeof(struct ipv6hdr);
#pragma unroll
        for (int i = 0; i < MS_MAX_EXTHDRS + 1; i++) {
            if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
                nh != IPPROTO_FRAGMENT && nh != IPPROTO_AH)
                break;
            if (i == MS_MAX_EXTHDRS)
                return MS_DROP_PARSE;
            if (off > MS_MAX_L4_OFF)
                return MS_DROP_PARSE;
            __u8 *h = data + off;
            if ((void *)(h + 8) > data_end)
                return PARSE_NEED_PULL;
            __u32 len;
            if (nh == IPPROTO_FRAGMENT) {
                if (*(__u16 *)(h + 2) & bpf_htons(0xFFF8))
                    return MS_DROP_FRAGMENT;
                len = 8;
            } else if (nh == IPPROTO_AH) {
                len = ((__u32)h[1] + 2) * 4;
            } else {
                len = ((__u32)h[1] + 1) * 8;
            }
            nh = h[0];
            off += len;
            if (off > MS_MAX_L4_OFF)
                return MS_DROP_PARSE;
            if (data + off > data_end)
                return PARSE_NEED_PULL;
        }
        p->proto = nh;
        return parse_l4(data, data_end, off, p);
    }
    return MS_DROP_PARSE;
}

/* The tuple-space search for one family: the winning rule in *out, or out->score 0 (none).
 * Stored scores are the rule's score + 1, so 0 means "no match". *out must be map memory (the
 * scratch entry): the verifier does not track its contents, so the paths through the loop
 * (match or not, at each shape) stay one state instead of doubling per shape. */
static __always_inline __u64 ms_mix(__u64 h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static __always_inline __u64 ms_ports_word(__u16 sport, __u16 dport, __u8 proto, __u8 dir)
{
    return (__u64)sport << 48 | (__u64)dport << 32 | (__u64)proto << 8 | dir;
}

/* 1 when the shape's filter says the key may be in its table (or it has no filter). */
static __always_inline int bloom_maybe(struct ms_shape *s, __u64 h)
{
    if (s->bloom_shift == 0)
        return 1;
    __u64 bit = h >> (s->bloom_shift & 63);
    __u32 widx = s->bloom_off + (__u32)(bit >> 6);
    __u64 *w = blooms.lookup(&widx);
    return w && ((*w >> (bit & 63)) & 1);
}

static __always_inline __u32 judge4(struct ms_pkt *p, __u32 bank, __u32 n, struct ms_rule_val *out)
{
    struct ms_rule_key4 k = {};
    out->score = 0;
    __u32 base = bank * 2 * MS_MAX_SHAPES;
    /* The verifier must see the loop's constant bound on every path: keep the compiler from
     * folding the two exits into one comparison against the unknown n. */
    asm volatile("" : "+r"(n));
    __u32 i;
#pragma clang loop unroll(disable)
    for (i = 0; i < MS_MAX_SHAPES; i++) {
        asm volatile("" : "+r"(i));
        if (i >= n)
            break;
        __u32 idx = base + i;
        struct ms_shape *s = shapes.lookup(&idx);
        if (!s || out->score >= s->max_score)
            break;
        k.shape = bank * MS_MAX_SHAPES + i;
        k.dir = p->dir;
        k.proto = p->proto & s->proto_mask;
        k.sport = p->sport & s->sport_mask;
        k.dport = p->dport & s->dport_mask;
        k.src = p->src[0] & s->src_mask[0];
        k.dst = p->dst[0] & s->dst_mask[0];
        __u64 h = ms_mix(ms_mix((__u64)k.src << 32 | k.dst) ^
                         ms_ports_word(k.sport, k.dport, k.proto, k.dir));
        if (!bloom_maybe(s, h))
            continue;
        struct ms_rule_val *v = rules4.lookup(&k);
        if (v && v->score > out->score)
            *out = *v;
    }
    return i; /* shapes examined (filtered out or probed) */
}

static __always_inline __u32 judge6(struct ms_pkt *p, __u32 bank, __u32 n, struct ms_rule_val *out)
{
    struct ms_rule_key6 k = {};
    out->score = 0;
    __u32 base = (bank * 2 + 1) * MS_MAX_SHAPES;
    /* The verifier must see the loop's constant bound on every path: keep the compiler from
     * folding the two exits into one comparison against the unknown n. */
    asm volatile("" : "+r"(n));
    __u32 i;
#pragma clang loop unroll(disable)
    for (i = 0; i < MS_MAX_SHAPES; i++) {
        asm volatile("" : "+r"(i));
        if (i >= n)
            break;
        __u32 idx = base + i;
        struct ms_shape *s = shapes.lookup(&idx);
        if (!s || out->score >= s->max_score)
            break;
        k.shape = bank * MS_MAX_SHAPES + i;
        k.dir = p->dir;
        k.proto = p->proto & s->proto_mask;
        k.sport = p->sport & s->sport_mask;
        k.dport = p->dport & s->dport_mask;
        k.src[0] = p->src[0] & s->src_mask[0];
        k.src[1] = p->src[1] & s->src_mask[1];
        k.src[2] = p->src[2] & s->src_mask[2];
        k.src[3] = p->src[3] & s->src_mask[3];
        k.dst[0] = p->dst[0] & s->dst_mask[0];
        k.dst[1] = p->dst[1] & s->dst_mask[1];
        k.dst[2] = p->dst[2] & s->dst_mask[2];
        k.dst[3] = p->dst[3] & s->dst_mask[3];
        __u64 h = ms_mix((__u64)k.src[1] << 32 | k.src[0]);
        h = ms_mix(h ^ ((__u64)k.src[3] << 32 | k.src[2]));
        h = ms_mix(h ^ ((__u64)k.dst[1] << 32 | k.dst[0]));
        h = ms_mix(h ^ ((__u64)k.dst[3] << 32 | k.dst[2]));
        h = ms_mix(h ^ ms_ports_word(k.sport, k.dport, k.proto, k.dir));
        if (!bloom_maybe(s, h))
            continue;
        struct ms_rule_val *v = rules6.lookup(&k);
        if (v && v->score > out->score)
            *out = *v;
    }
    return i; /* shapes examined (filtered out or probed) */
}

/* Judge a flow by the active bank: fills verdict, rule_id and slot. */
static __always_inline void judge(struct ms_pkt *p, __u32 bank, struct ms_bank *bk,
                                  struct ms_rule_val *out, struct ms_counters *ctr)
{
    if (p->family == 4)
        ctr->c[C_SHAPE_PROBES] += judge4(p, bank, bk->nshapes4, out);
    else
        ctr->c[C_SHAPE_PROBES] += judge6(p, bank, bk->nshapes6, out);
    if (out->score) {
        ctr->c[C_POLICY_HITS]++;
    } else {
        ctr->c[C_POLICY_MISSES]++;
        out->action = bk->default_action;
        out->rule_id = 0;
        out->slot = 0;
    }
}

static __always_inline void emit(struct ms_sess_key *k, struct ms_sess_val *s, __u8 kind,
                                 __u8 tcp_flags, struct ms_counters *ctr)
{
    struct ms_event *e = events.ringbuf_reserve(sizeof(struct ms_event));
    if (!e) {
        ctr->c[C_EVENTS_LOST]++;
        return;
    }
    e->ts = bpf_ktime_get_ns();
    e->packets = s->ev_pkts;
    e->bytes = s->ev_bytes;
    e->ifindex = k->ifindex;
    e->rule_id = s->rule_id;
    e->gen = s->gen;
    e->family = k->family;
    e->proto = k->proto;
    e->direction = s->orig_dir;
    e->verdict = s->verdict;
    if (s->a_is_src) {
        __builtin_memcpy(e->src, k->a, 16);
        __builtin_memcpy(e->dst, k->b, 16);
        e->sport = bpf_ntohs(k->aport);
        e->dport = bpf_ntohs(k->bport);
    } else {
        __builtin_memcpy(e->src, k->b, 16);
        __builtin_memcpy(e->dst, k->a, 16);
        e->sport = bpf_ntohs(k->bport);
        e->dport = bpf_ntohs(k->aport);
    }
    e->tcp_flags = tcp_flags;
    e->kind = kind;
    e->pad = 0;
    events.ringbuf_submit(e, 0);
    ctr->c[C_EVENTS_SENT]++;
}

/* The flow's first packet, rebuilt from its session, for judging it again in its own direction. */
static __always_inline void orig_packet(struct ms_sess_key *k, struct ms_sess_val *s,
                                        struct ms_pkt *p)
{
    p->family = k->family;
    p->proto = k->proto;
    p->dir = s->orig_dir;
    if (s->a_is_src) {
        __builtin_memcpy(p->src, k->a, 16);
        __builtin_memcpy(p->dst, k->b, 16);
        p->sport = k->aport;
        p->dport = k->bport;
    } else {
        __builtin_memcpy(p->src, k->b, 16);
        __builtin_memcpy(p->dst, k->a, 16);
        p->sport = k->bport;
        p->dport = k->aport;
    }
}

/* Per packet bookkeeping once the flow's session holds its verdict: session, event, rule and
 * verdict counters. Returns the TC action. */
static __always_inline int account(struct ms_sess_key *key, struct ms_sess_val *s, __u8 src_is_a,
                                   __u8 tcp_flags, __u8 dir, __u32 len, __u64 now,
                                   struct ms_counters *ctr)
{
    __u32 zero = 0;
    __u32 d = src_is_a == s->a_is_src ? 0 : 1;
    s->pkts[d & 1]++;
    s->bytes[d & 1] += len;
    s->last_seen = now;
    s->tcp_flags |= tcp_flags;
    __u8 verdict = s->verdict;
    __u32 slot = s->slot;
    if (verdict != MS_ALLOW) {
        s->ev_pkts++;
        s->ev_bytes += len;
        if (s->ev_last == 0) {
            s->ev_last = now;
            emit(key, s, MS_EV_NEW, tcp_flags, ctr);
            s->ev_pkts = 0;
            s->ev_bytes = 0;
        } else {
            struct ms_settings *st = settings.lookup(&zero);
            if (st && now - s->ev_last >= st->event_interval_ns) {
                s->ev_last = now;
                emit(key, s, MS_EV_UPDATE, s->tcp_flags, ctr);
                s->ev_pkts = 0;
                s->ev_bytes = 0;
            }
        }
    }
    struct ms_rule_ctr *rs = rule_stats.lookup(&slot);
    if (rs) {
        rs->packets++;
        rs->bytes += len;
        rs->last_hit = now;
    }
    __u32 ci = C_DIR_VERDICT + (dir - 1) * 4 + verdict;
    /* keep the bound check: the compiler would fold it away and the verifier needs it */
    asm volatile("" : "+r"(ci));
    if (ci < C_MAX)
        ctr->c[ci]++;
    if (verdict == MS_DENY) {
        ctr->c[C_DENIED]++;
        return TC_ACT_SHOT;
    }
    if (verdict == MS_LOG)
        ctr->c[C_LOGGED]++;
    else
        ctr->c[C_ALLOWED]++;
    return TC_ACT_OK;
}


/* The fast path: parse, then a session hit under the live generation decides. Anything else
 * (a new flow, a flow whose generation is stale) goes to ms_judge by tail call; the judge's
 * probe loop gets a program of its own so the verifier walks it once, not once per parse path. */
static __always_inline int classify(struct __sk_buff *skb, __u8 dir)
{
    __u32 zero = 0;
    struct ms_counters *ctr = counters.lookup(&zero);
    if (!ctr)
        return TC_ACT_SHOT;
    ctr->c[C_TOTAL]++;
    ctr->c[C_BYTES_TOTAL] += skb->len;

    struct ms_pkt p = {};
    p.dir = dir;
    int rc = parse(skb, &p);
    if (rc == PARSE_NEED_PULL) {
        /* Headers beyond the linear part of a real skb: make them linear once and look again. */
        __u32 len = skb->len < MS_PULL_LEN ? skb->len : MS_PULL_LEN;
        if ((long)skb->data_end - (long)skb->data < len && bpf_skb_pull_data(skb, len) == 0) {
            __builtin_memset(&p, 0, sizeof(p));
            p.dir = dir;
            rc = parse(skb, &p);
        }
        if (rc == PARSE_NEED_PULL)
            rc = MS_DROP_PARSE;
    }
    if (rc == MS_PASS_L2) {
        ctr->c[C_L2_PASSED]++;
        return TC_ACT_OK;
    }
    if (rc == MS_DROP_FRAGMENT) {
        ctr->c[C_FRAGMENT_DROPS]++;
        return TC_ACT_SHOT;
    }
    if (rc != PARSE_OK) {
        ctr->c[C_PARSE_DROPS]++;
        return TC_ACT_SHOT;
    }

    struct ms_sess_key kbuf = {};
    struct ms_sess_key *key = &kbuf;
    key->ifindex = skb->ifindex;
    key->family = p.family;
    key->proto = p.proto;
    __u8 src_is_a = 1;
    if (p.family == 4) {
        __u32 a = bpf_ntohl(p.src[0]), b = bpf_ntohl(p.dst[0]);
        src_is_a = a < b || (a == b && bpf_ntohs(p.sport) <= bpf_ntohs(p.dport));
    } else {
#pragma unroll
        for (int w = 0; w < 4; w++) {
            __u32 a = bpf_ntohl(p.src[w]), b = bpf_ntohl(p.dst[w]);
            if (a != b) {
                src_is_a = a < b;
                goto ordered;
            }
        }
        src_is_a = bpf_ntohs(p.sport) <= bpf_ntohs(p.dport);
    }
ordered:
    if (src_is_a) {
        __builtin_memcpy(key->a, p.src, 16);
        __builtin_memcpy(key->b, p.dst, 16);
        key->aport = p.sport;
        key->bport = p.dport;
    } else {
        __builtin_memcpy(key->a, p.dst, 16);
        __builtin_memcpy(key->b, p.src, 16);
        key->aport = p.dport;
        key->bport = p.sport;
    }

    __u64 *actp = active.lookup(&zero);
    if (!actp)
        return TC_ACT_SHOT;
    __u32 gen = *actp >> 1;
    __u32 len = skb->len;
    struct ms_sess_val *s = sessions.lookup(key);
    if (s && s->gen == gen) {
        ctr->c[C_SESSION_HITS]++;
        return account(key, s, src_is_a, p.tcp_flags, dir, len, bpf_ktime_get_coarse_ns(), ctr);
    }
    struct ms_scratch *sc = scratch.lookup(&zero);
    if (!sc)
        return TC_ACT_SHOT;
    sc->key = kbuf;
    sc->p = p;
    sc->len = len;
    sc->src_is_a = src_is_a;
    slow_path.call(skb, 0);
    /* Only reached when the judge program is missing: fail closed. */
    ctr->c[C_PARSE_DROPS]++;
    return TC_ACT_SHOT;
}

int ms_ingress(struct __sk_buff *skb)
{
    return classify(skb, MS_DIR_INGRESS);
}

int ms_egress(struct __sk_buff *skb)
{
    return classify(skb, MS_DIR_EGRESS);
}

/* The slow path: judge a new flow, or a known one again after a policy change, and record it. */
int ms_judge(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct ms_counters *ctr = counters.lookup(&zero);
    struct ms_scratch *sc = scratch.lookup(&zero);
    __u64 *actp = active.lookup(&zero);
    if (!ctr || !sc || !actp)
        return TC_ACT_SHOT;
    __u64 act = *actp;
    __u32 bank = act & 1;
    __u32 gen = act >> 1;
    struct ms_bank *bk = banks.lookup(&bank);
    if (!bk)
        return TC_ACT_SHOT;
    struct ms_sess_key key = sc->key;
    struct ms_pkt p = sc->p;
    __u32 len = sc->len;
    __u8 src_is_a = sc->src_is_a;
    __u8 dir = p.dir;
    if (dir != MS_DIR_INGRESS && dir != MS_DIR_EGRESS)
        return TC_ACT_SHOT;
    __u64 now = bpf_ktime_get_coarse_ns();

    struct ms_sess_val *s = sessions.lookup(&key);
    /* A new flow is judged as it is; a known one after a policy change is judged again as its
     * first packet was, so the new set sees the flow in its original direction. */
    struct ms_pkt jp = p;
    if (s)
        orig_packet(&key, s, &jp);
    struct ms_rule_val *rv = &sc->rv;
    judge(&jp, bank, bk, rv, ctr);
    if (s) {
        ctr->c[C_REJUDGED]++;
        if (rv->action != s->verdict || rv->rule_id != s->rule_id)
            s->ev_last = 0; /* report the flow afresh under its new verdict */
        s->verdict = rv->action;
        s->rule_id = rv->rule_id;
        s->slot = rv->slot;
        s->gen = gen;
        return account(&key, s, src_is_a, p.tcp_flags, dir, len, now, ctr);
    }
    struct ms_sess_val nv = {};
    nv.first_seen = now;
    nv.gen = gen;
    nv.rule_id = rv->rule_id;
    nv.slot = rv->slot;
    nv.verdict = rv->action;
    nv.orig_dir = dir;
    nv.a_is_src = src_is_a;
    /* Count the first packet (and send its event) in the new entry before inserting it, so
     * the insert is the only map operation: no lookup after it. */
    int action = account(&key, &nv, src_is_a, p.tcp_flags, dir, len, now, ctr);
    /* Should another CPU have inserted the flow meanwhile, ours replaces it: same verdict.
     * If the table cannot keep the flow, this packet's verdict stands all the same. */
    if (sessions.update(&key, &nv) == 0)
        ctr->c[C_NEW_SESSIONS]++;
    else
        ctr->c[C_SESSION_CREATE_FAILED]++;
    return action;
}
