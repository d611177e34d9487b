/* microseg: the TC classifier. Compiled at run time by bcc (streamer/datapath/).
 *
 * Per packet: parse (Ethernet, VLAN/QinQ, IPv4 with options, IPv6 with extension headers,
 * TCP/UDP/ICMP/ICMPv6), find the flow's session (both directions share one entry), and on a
 * miss or after a policy change judge the flow by the tuple-space search below. DENY drops;
 * DENY and LOG flows put events on the ring buffer (first packet, then at most one per flow
 * per interval). What cannot be parsed far enough to judge is dropped and counted.
 *
 * Two views in one pass (contract §6): the search keeps the enforced view's winner (the best
 * enforce-mode rule; else the bank's default_action), which decides, and the staged view's
 * (the best rule of either mode; else staged_default), which only reports. Where they differ
 * the session holds the staged verdict, rule and counter slot, the flow's events carry them,
 * a flow either view does not simply allow is reported, and the staged rule's counters count
 * what it would have decided. Failsafe entries (in `settings`) are checked before any rule
 * when a flow is judged: such a flow is allowed, by no rule, under MS_FAILSAFE_SLOT.
 *
 * Why tuple-space search: the policy model allows CIDRs of any length on both addresses,
 * port ranges and wildcards, so no single exact-match or LPM lookup can answer it. Rules that
 * share their masks (a "shape") live in one hash table keyed by the masked fields; a packet
 * probes one hash per shape, so the cost follows the number of distinct shapes, not rules.
 * Shapes are probed best-first (by the highest score they hold) and probing stops as soon as
 * no remaining shape can beat the match in hand. Port ranges are split into prefix-aligned
 * blocks by the compiler (streamer/datapath/) so they fit masks too. bcc cannot relocate
 * bpf_loop callbacks, so the probe loop is a verifier-bounded loop over MS_MAX_SHAPES.
 *
 * Programs, chained by tail calls through `slow_path`: ms_ingress/ms_egress (parse, fragments,
 * a live session hit decides) -> ms_related (ICMP errors only) -> ms_judge (the search alone:
 * its loop is what the verifier's budget goes to) -> ms_record (the session table).
 *
 * State: each session carries a TCP state machine (conntrack's states) and an idle
 * timeout class; an entry found past its timeout, or a SYN on a TIME_WAIT/CLOSED entry, is a new
 * flow (judged afresh and replacing the entry). The table is a plain preallocated hash, not an
 * LRU: nothing is ever evicted behind our back, so active sessions (inserts minus removals) are
 * exact, and when it is full a new flow is judged on every packet and simply not cached: never
 * fail open. Userspace (streamer/datapath/, reap_expired) removes expired entries.
 * A TCP packet of a connection the table does not know (it expired, or was never seen since a
 * restart) is judged as a new flow in its own direction: no SYN is required.
 * Fragments: a first fragment is judged by its own header and its ports are remembered (LRU
 * `frags`, keyed by addresses, protocol and id; a newer first with the same key takes the
 * place of the older one), and later fragments are judged as packets of the newest first's
 * flow; a later fragment with no remembered first, one overlapping the L4 header, or a first
 * fragment too short to hold it is dropped and counted. ICMP errors quoting a packet of a live
 * allowed flow pass as part of it ("related"), whatever the policy says of ICMP.
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

#ifndef MS_FRAGS
#define MS_FRAGS 16384
#endif

#define MS_MAX_VLANS 2
#define MS_MAX_EXTHDRS 8
/* L4 headers further in than this are not looked for: the packet is dropped as unparsable. */
#define MS_MAX_L4_OFF 1024
#define MS_PULL_LEN 1100

#define PARSE_OK 255
#define PARSE_NEED_PULL 254
#define PARSE_FRAG_TINY 253

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

/* A plain (preallocated) hash: a full table refuses inserts instead of evicting live flows. */
BPF_TABLE_PINNED("hash", struct ms_sess_key, struct ms_sess_val, sessions, MS_SESSIONS,
                 MS_PIN "/sessions");
BPF_TABLE_PINNED("lru_hash", struct ms_frag_key, struct ms_frag_val, frags, MS_FRAGS,
                 MS_PIN "/frags");
BPF_TABLE_PINNED("array", u32, struct ms_reaped, reaped, 1, MS_PIN "/reaped");
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

/* The event state of deny/log flows that found the session table full (their own would be in
 * their session): without it each of their packets would be a "new" flow with an event. Not
 * pinned: it only thins events. An LRU: a flow pushed out sends one event early. */
struct ms_evlimit {
    __u64 ev_last;
    __u64 ev_pkts;
    __u64 ev_bytes;
};
BPF_TABLE("lru_hash", struct ms_sess_key, struct ms_evlimit, evlimit, 8192);

/* Judges in flight by CPU and bank (struct ms_judging): the agent waits for a bank's count to
 * be 0 on every CPU before writing to the bank it retired. Pinned, so the judges of a
 * previous agent's programs still running during a restart count in the same place. */
BPF_TABLE_PINNED("percpu_array", u32, struct ms_judging, judging, 1, MS_PIN "/judging");

/* Updating a map-of-maps waits for every running BPF program to finish (the kernel calls
 * synchronize_rcu): the fallback when counting judges cannot be trusted (see banks.py). */
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
    __u8 frag;       /* FRAG_* */
    __u8 frag_proto; /* the protocol that keys the fragment (see struct ms_frag_key) */
    __u8 icmp_err;   /* an ICMP/ICMPv6 error that may quote a packet of a known flow */
    __u8 pad;
    __u16 l4_off;    /* where the L4 header starts in the frame */
    __u16 frag_off;  /* a later fragment's offset; a first's L4 header end (ms_frag_val) */
    __u32 frag_id;
};

/* What the fast path hands the slow path across the tail call. Per CPU: a TC program runs to
 * completion on its CPU, so the entry cannot be overwritten between the two halves. */
struct ms_scratch {
    struct ms_rule_val rv; /* the judge's result */
    struct ms_pkt p;
    struct ms_pkt jp;      /* what the judge judges: the packet, or its flow's first packet */
    struct ms_sess_key key;
    __u32 len;
    __u8 src_is_a;
    __u8 renew;    /* the session entry ends: 1 expired, 2 finished and reopened by a SYN */
    __u8 was_half; /* ... and it was half-open */
    __u8 rejudge;  /* a live session judged again after a policy change */
    __u32 gen;     /* the generation the judge read */
    __u32 pad2;
};
BPF_PERCPU_ARRAY(scratch, struct ms_scratch, 1);
/* Pinned: an unpinned program array is emptied when its last file descriptor closes, which
 * would leave the filters of a dead agent unable to judge new flows. */
BPF_TABLE_PINNED("prog", int, int, slow_path, 3, MS_PIN "/slow_path");
#define SLOW_JUDGE 0   /* ms_judge: the tuple-space search */
#define SLOW_RELATED 1 /* ms_related: ICMP errors */
#define SLOW_RECORD 2  /* ms_record: the session table after a judgement */

/* L4 header at data+off: ports, flags, or a verdict (PASS_L2 for neighbour discovery and
 * link-local MLD). */
static __always_inline int parse_l4(void *data, void *data_end, __u32 off, struct ms_pkt *p)
{
    if (off > MS_MAX_L4_OFF)
        return MS_DROP_PARSE;
    p->l4_off = off;
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
        } else if (l4[0] == 3 || l4[0] == 11) { /* destination unreachable, time exceeded */
            p->icmp_err = 1;
        }
        return PARSE_OK;
    case IPPROTO_ICMPV6:
        if (p->family != 6)
            return PARSE_OK;
        if ((void *)(l4 + 8) > data_end)
            return PARSE_NEED_PULL;
        if (l4[0] >= 133 && l4[0] <= 137) /* RS, RA, NS, NA, redirect */
            return MS_PASS_L2;
        /* MLD (query, v1 report, done, v2 report) from a link-local or unspecified source:
         * link-scoped like ND (routers never forward such sources), and needed by it: a
         * snooping switch that sees no reports stops forwarding the solicited-node groups. */
        if ((l4[0] >= 130 && l4[0] <= 132) || l4[0] == 143) {
            __u8 *s = (__u8 *)p->src;
            if ((s[0] == 0xfe && (s[1] & 0xc0) == 0x80) ||
                (p->src[0] | p->src[1] | p->src[2] | p->src[3]) == 0)
                return MS_PASS_L2;
        }
        if (l4[0] == 128 || l4[0] == 129) {
            p->sport = *(__u16 *)(l4 + 4);
            p->dport = p->sport;
        } else if (l4[0] >= 1 && l4[0] <= 3) { /* unreachable, packet too big, time exceeded */
            p->icmp_err = 1;
        }
        return PARSE_OK;
    default:
        return PARSE_OK;
    }
}

/* The smallest L4 header a first fragment must hold whole (what the classifier reads). */
static __always_inline __u32 l4_min(struct ms_pkt *p)
{
    if (p->proto == IPPROTO_TCP)
        return 20;
    if (p->proto == IPPROTO_UDP)
        return 8;
    if ((p->proto == IPPROTO_ICMP && p->family == 4) ||
        (p->proto == IPPROTO_ICMPV6 && p->family == 6))
        return 8;
    return 0;
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
        __u32 tot = bpf_ntohs(ip->tot_len);
        if (tot < hlen)
            return MS_DROP_PARSE;
        p->family = 4;
        p->proto = ip->protocol;
        p->src[0] = ip->saddr;
        p->dst[0] = ip->daddr;
        __u16 fo = bpf_ntohs(ip->frag_off);
        if (fo & 0x3FFF) { /* MF or an offset: a fragment */
            p->frag_id = ip->id;
            p->frag_proto = ip->protocol;
            if (fo & 0x1FFF) {
                p->frag = FRAG_LATER;
                p->frag_off = (fo & 0x1FFF) * 8;
                return PARSE_OK;
            }
            p->frag = FRAG_FIRST;
        }
        int rc = parse_l4(data, data_end, off + hlen, p);
        if (rc == PARSE_OK && p->frag == FRAG_FIRST) {
            /* The L4 header must lie whole inside this fragment (RFC 1858 tiny fragments). */
            __u32 need = l4_min(p);
            if (hlen + need > tot)
                return PARSE_FRAG_TINY;
            p->frag_off = need;
        }
        return rc;
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
        __u32 ip_end = off + sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len);
        __u32 frag_start = 0;
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
                __u16 fo = bpf_ntohs(*(__u16 *)(h + 2));
                if (fo & 0xFFF8) {
                    p->frag = FRAG_LATER;
                    p->frag_off = fo & 0xFFF8;
                    p->frag_proto = h[0];
                    p->frag_id = *(__u32 *)(h + 4);
                    p->proto = h[0];
                    return PARSE_OK;
                }
                if (fo & 1) { /* offset 0 with M: a first fragment (M clear: atomic, whole) */
                    p->frag = FRAG_FIRST;
                    p->frag_proto = h[0];
                    p->frag_id = *(__u32 *)(h + 4);
                    frag_start = off + 8;
                }
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
        int rc = parse_l4(data, data_end, off, p);
        if (rc == PARSE_OK && p->frag == FRAG_FIRST) {
            __u32 need = l4_min(p);
            if (off + need > ip_end)
                return PARSE_FRAG_TINY;
            p->frag_off = off - frag_start + need;
        }
        return rc;
    }
    return MS_DROP_PARSE;
}

/* The session key of a packet (direction independent: endpoint a is the lower (address, port)
 * pair). Returns 1 when the packet's source is endpoint a. */
static __always_inline __u8 make_key(struct ms_pkt *p, __u32 ifindex, struct ms_sess_key *key)
{
    key->ifindex = ifindex;
    key->family = p->family;
    key->proto = p->proto;
    __u8 src_is_a = 1;
    if (p->family == 4) {
        __u32 a = bpf_ntohl(p->src[0]), b = bpf_ntohl(p->dst[0]);
        src_is_a = a < b || (a == b && bpf_ntohs(p->sport) <= bpf_ntohs(p->dport));
    } else {
        src_is_a = 2;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            __u32 a = bpf_ntohl(p->src[w]), b = bpf_ntohl(p->dst[w]);
            if (src_is_a == 2 && a != b)
                src_is_a = a < b;
        }
        if (src_is_a == 2)
            src_is_a = bpf_ntohs(p->sport) <= bpf_ntohs(p->dport);
    }
    if (src_is_a) {
        __builtin_memcpy(key->a, p->src, 16);
        __builtin_memcpy(key->b, p->dst, 16);
        key->aport = p->sport;
        key->bport = p->dport;
    } else {
        __builtin_memcpy(key->a, p->dst, 16);
        __builtin_memcpy(key->b, p->src, 16);
        key->aport = p->dport;
        key->bport = p->sport;
    }
    return src_is_a;
}

/* A session past its idle timeout (the clock may be a hair behind another CPU's stamp). */
static __always_inline int expired(struct ms_sess_val *s, struct ms_settings *st, __u64 now)
{
    __u64 to = st->timeout_ns[s->tclass & (MS_TO_MAX - 1)];
    return now > s->last_seen && now - s->last_seen > to;
}

/* A SYN (without ACK) on a finished connection opens a new one on the same tuple. */
static __always_inline int reopens(struct ms_sess_val *s, struct ms_pkt *p)
{
    return p->proto == IPPROTO_TCP && s->tcp_state >= MS_TCP_TIME_WAIT &&
           (p->tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST)) == TCP_SYN;
}

#define TR_HALF_IN 1
#define TR_HALF_OUT 2
#define TR_CLOSED 4

static __always_inline int half_open(__u8 st)
{
    return st == MS_TCP_SYN_SENT || st == MS_TCP_SYN_RECV;
}

/* The TCP state machine (mirrored by tcp_next in streamer/datapath/): the state after a packet
 * with `flags` from side d (0: the originator, 1: the responder). */
static __always_inline __u8 tcp_next(__u8 st, __u32 d, __u8 f, __u8 *fins)
{
    if (f & TCP_RST)
        return MS_TCP_CLOSED;
    if (f & TCP_SYN) {
        if (f & TCP_ACK) {
            if (st == MS_TCP_NONE || (st == MS_TCP_SYN_SENT && d == 1))
                return MS_TCP_SYN_RECV;
            return st;
        }
        return st == MS_TCP_NONE ? MS_TCP_SYN_SENT : st;
    }
    if (f & TCP_FIN) {
        if (st >= MS_TCP_TIME_WAIT)
            return st;
        __u8 fins_now = *fins;
        if (!(fins_now & 3))
            fins_now |= d ? 4 : 0;
        fins_now |= d ? 2 : 1;
        *fins = fins_now;
        if ((fins_now & 3) == 3)
            return MS_TCP_LAST_ACK;
        return st == MS_TCP_CLOSE_WAIT ? MS_TCP_CLOSE_WAIT : MS_TCP_FIN_WAIT;
    }
    if (f & TCP_ACK) {
        __u32 first_fin = (*fins & 4) ? 1 : 0;
        if (st == MS_TCP_NONE || (st == MS_TCP_SYN_RECV && d == 0))
            return MS_TCP_ESTABLISHED;
        if (st == MS_TCP_FIN_WAIT && d != first_fin)
            return MS_TCP_CLOSE_WAIT;
        if (st == MS_TCP_LAST_ACK && d == first_fin)
            return MS_TCP_TIME_WAIT;
    }
    return st;
}

/* Advance the session's state and timeout class after a packet; returns TR_* transitions. */
static __always_inline __u32 advance(struct ms_sess_val *s, __u8 proto, __u32 d, __u8 flags)
{
    if (proto == IPPROTO_TCP) {
        __u8 old = s->tcp_state;
        /* the common case, decided before the state machine: data on an open connection */
        if (old == MS_TCP_ESTABLISHED && !(flags & (TCP_SYN | TCP_FIN | TCP_RST)))
            return 0;
        __u8 fins = s->fins;
        __u8 st = tcp_next(old, d, flags, &fins);
        /* stores only on change: the line is read by the other direction's CPU */
        if (fins != s->fins)
            s->fins = fins;
        if (st != s->tclass)
            s->tclass = st;
        if (st == old)
            return 0;
        s->tcp_state = st;
        __u32 tr = 0;
        if (half_open(st) && !half_open(old))
            tr |= TR_HALF_IN;
        if (half_open(old) && !half_open(st))
            tr |= TR_HALF_OUT;
        if (st >= MS_TCP_TIME_WAIT && old < MS_TCP_TIME_WAIT)
            tr |= TR_CLOSED;
        return tr;
    }
    __u8 tc;
    /* a UDP flow is a stream once it has seen a reply; read from the class itself, not the
     * reply counter, whose line belongs to the other direction's CPU */
    if (proto == IPPROTO_UDP)
        tc = d || s->tclass == MS_TO_UDP_STREAM ? MS_TO_UDP_STREAM : MS_TO_UDP;
    else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
        tc = MS_TO_ICMP;
    else
        tc = MS_TO_OTHER;
    if (tc != s->tclass)
        s->tclass = tc;
    return 0;
}

static __always_inline void count_transitions(struct ms_counters *ctr, __u32 tr)
{
    if (tr & TR_HALF_IN)
        ctr->c[C_HALF_OPEN_IN]++;
    if (tr & TR_HALF_OUT)
        ctr->c[C_HALF_OPEN_OUT]++;
    if (tr & TR_CLOSED)
        ctr->c[C_CLOSED_SESSIONS]++;
}

/* The bloom hash of a masked rule key (see MS_BLOOM_BANK_WORDS): judge_family folds the
 * key's words through ms_mix and ends with ms_ports_word. key_hash in
 * streamer/datapath/compiler.py computes the same from the packed key: change both together. */
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

/* The tuple-space search for one family: the winning rule in *out, or out->score 0 (none).
 * Stored scores are the rule's score + 1, so 0 means "no match". *out must be map memory (the
 * scratch entry): the verifier does not track its contents, so the paths through the loop
 * (match or not, at each shape) stay one state instead of doubling per shape.
 * family is a constant (4 or 6) at each call: once inlined, the compiler folds the family
 * branches away, so each family gets its own loop, the same code as two hand-written copies. */
static __always_inline __u32 judge_family(struct ms_pkt *p, __u32 bank, __u32 n,
                                          struct ms_rule_val *out, const int family)
{
    struct ms_rule_key4 k4 = {};
    struct ms_rule_key6 k6 = {};
    out->score = 0;
    out->s_score = 0;
    __u32 base = (bank * 2 + (family == 6)) * MS_MAX_SHAPES;
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
        /* max_score is the best of either view's in the shape, and the staged winner is never
         * below the enforced one: once the enforced winner reaches it, neither can improve. */
        if (!s || out->score >= s->max_score)
            break;
        struct ms_rule_val *v;
        if (family == 4) {
            k4.shape = s->key_shape;
            k4.dir = p->dir;
            k4.proto = p->proto & s->proto_mask;
            k4.sport = p->sport & s->sport_mask;
            k4.dport = p->dport & s->dport_mask;
            k4.src = p->src[0] & s->src_mask[0];
            k4.dst = p->dst[0] & s->dst_mask[0];
            __u64 h = ms_mix(ms_mix((__u64)k4.src << 32 | k4.dst) ^
                             ms_ports_word(k4.sport, k4.dport, k4.proto, k4.dir));
            if (!bloom_maybe(s, h))
                continue;
            v = rules4.lookup(&k4);
        } else {
            k6.shape = s->key_shape;
            k6.dir = p->dir;
            k6.proto = p->proto & s->proto_mask;
            k6.sport = p->sport & s->sport_mask;
            k6.dport = p->dport & s->dport_mask;
            k6.src[0] = p->src[0] & s->src_mask[0];
            k6.src[1] = p->src[1] & s->src_mask[1];
            k6.src[2] = p->src[2] & s->src_mask[2];
            k6.src[3] = p->src[3] & s->src_mask[3];
            k6.dst[0] = p->dst[0] & s->dst_mask[0];
            k6.dst[1] = p->dst[1] & s->dst_mask[1];
            k6.dst[2] = p->dst[2] & s->dst_mask[2];
            k6.dst[3] = p->dst[3] & s->dst_mask[3];
            __u64 h = ms_mix((__u64)k6.src[1] << 32 | k6.src[0]);
            h = ms_mix(h ^ ((__u64)k6.src[3] << 32 | k6.src[2]));
            h = ms_mix(h ^ ((__u64)k6.dst[1] << 32 | k6.dst[0]));
            h = ms_mix(h ^ ((__u64)k6.dst[3] << 32 | k6.dst[2]));
            h = ms_mix(h ^ ms_ports_word(k6.sport, k6.dport, k6.proto, k6.dir));
            if (!bloom_maybe(s, h))
                continue;
            v = rules6.lookup(&k6);
        }
        if (v) {
            /* Two winners: the staged view's (every rule) and the enforced view's (enforce
             * rules only; a key only staged rules give has score 0 there). Where no staged
             * rule is involved both halves are the same rule and both move together. */
            if (v->s_score > out->s_score) {
                out->s_score = v->s_score;
                out->s_rule_id = v->s_rule_id;
                out->s_slot = v->s_slot;
                out->s_action = v->s_action;
            }
            if (v->score > out->score) {
                out->score = v->score;
                out->rule_id = v->rule_id;
                out->slot = v->slot;
                out->action = v->action;
            }
        }
    }
    return i; /* shapes examined (filtered out or probed) */
}

/* Judge a flow by the active bank: fills both views' verdict, rule_id and slot (a view no
 * rule decides gets its default: default_action, staged_default). The scores stay as found,
 * so the views differ exactly when the scores or the actions do (see staged_of). */
static __always_inline void judge(struct ms_pkt *p, __u32 bank, struct ms_bank *bk,
                                  struct ms_rule_val *out, struct ms_counters *ctr)
{
    if (p->family == 4)
        ctr->c[C_SHAPE_PROBES] += judge_family(p, bank, bk->nshapes4, out, 4);
    else
        ctr->c[C_SHAPE_PROBES] += judge_family(p, bank, bk->nshapes6, out, 6);
    if (out->score) {
        ctr->c[C_POLICY_HITS]++;
    } else {
        ctr->c[C_POLICY_MISSES]++;
        out->action = bk->default_action;
        out->rule_id = 0;
        out->slot = MS_DEFAULT_SLOT;
    }
    if (!out->s_score) {
        out->s_action = bk->staged_default;
        out->s_rule_id = 0;
        out->s_slot = MS_DEFAULT_SLOT;
    }
}

/* The flow's staged verdict: MS_NO_STAGED where the staged view's winner is the enforced
 * one's (the same rule, or both defaults alike), else what the staged view decides. */
static __always_inline __u8 staged_of(struct ms_rule_val *rv)
{
    if (rv->s_score != rv->score || rv->s_action != rv->action)
        return rv->s_action;
    return MS_NO_STAGED;
}

/* A flow is reported (events) when either view does not simply allow it. */
static __always_inline int reported(__u8 verdict, __u8 staged_verdict)
{
    /* staged_verdict + 1 > 1: neither MS_NO_STAGED (0xff) nor MS_ALLOW (0) */
    return verdict != MS_ALLOW || (__u8)(staged_verdict + 1) > 1;
}

/* Whether a flow's first packet is failsafe traffic: an entry of its direction, protocol and
 * destination port whose remote end (the source of an ingress flow, the destination of an
 * egress one) holds the packet's. Family 0 entries have addr and mask 0: either family. */
static __always_inline int failsafe(struct ms_pkt *p, struct ms_settings *st)
{
    __u32 n = st->nfailsafe;
    asm volatile("" : "+r"(n));
    __u32 *r = p->dir == MS_DIR_INGRESS ? p->src : p->dst;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < MS_MAX_FAILSAFE; i++) {
        if (i >= n)
            break;
        struct ms_failsafe *f = &st->failsafe[i];
        if (f->dir != p->dir || f->proto != p->proto || f->port != p->dport)
            continue;
        if (f->family && f->family != p->family)
            continue;
        if ((r[0] & f->mask[0]) == f->addr[0] && (r[1] & f->mask[1]) == f->addr[1] &&
            (r[2] & f->mask[2]) == f->addr[2] && (r[3] & f->mask[3]) == f->addr[3])
            return 1;
    }
    return 0;
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
    e->staged_verdict = s->staged_verdict;
    e->pad = 0;
    e->staged_rule_id = s->staged_rule_id;
    e->pad2 = 0;
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

/* Per packet bookkeeping once the flow's session holds its verdict: session, TCP state, event,
 * rule and verdict counters. Returns the TC action; *tr gets the state transitions (counted by
 * the caller: a new flow's only once its session is really in the table). */
static __always_inline int account(struct ms_sess_key *key, struct ms_sess_val *s, __u8 src_is_a,
                                   __u8 tcp_flags, __u8 dir, __u32 len, __u64 now,
                                   struct ms_settings *st, struct ms_counters *ctr, __u32 *tr)
{
    __u32 d = src_is_a == s->a_is_src ? 0 : 1;
    if (d) {
        s->pkts_reply++;
        s->bytes_reply += len;
    } else {
        s->pkts_orig++;
        s->bytes_orig += len;
    }
    /* the shared line is written only when a value changes (see struct ms_sess_val) */
    if (s->last_seen != now)
        s->last_seen = now;
    __u8 flags = s->tcp_flags | tcp_flags;
    if (flags != s->tcp_flags)
        s->tcp_flags = flags;
    *tr = advance(s, key->proto, d, tcp_flags);
    __u8 verdict = s->verdict;
    __u32 slot = s->slot;
    __u8 sv = s->staged_verdict;
    if (reported(verdict, sv)) {
        s->ev_pkts++;
        s->ev_bytes += len;
        if (s->ev_last == 0) {
            s->ev_last = now;
            emit(key, s, MS_EV_NEW, tcp_flags, ctr);
            s->ev_pkts = 0;
            s->ev_bytes = 0;
        } else if (now - s->ev_last >= st->event_interval_ns) {
            s->ev_last = now;
            emit(key, s, MS_EV_UPDATE, s->tcp_flags, ctr);
            s->ev_pkts = 0;
            s->ev_bytes = 0;
        }
    }
    struct ms_rule_ctr *rs = rule_stats.lookup(&slot);
    if (rs) {
        rs->packets++;
        rs->bytes += len;
        rs->last_hit = now;
    }
    if (sv != MS_NO_STAGED) {
        /* what the staged view's rule would have decided */
        __u32 sslot = s->staged_slot;
        struct ms_rule_ctr *ss = rule_stats.lookup(&sslot);
        if (ss) {
            ss->staged_packets++;
            ss->staged_bytes += len;
        }
    }
    if (slot == MS_FAILSAFE_SLOT)
        ctr->c[C_FAILSAFE_PASSED]++;
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

/* A flow newly judged into a staged difference: counted globally and for the staged rule. */
static __always_inline void count_staged_flow(struct ms_counters *ctr, __u32 slot)
{
    ctr->c[C_STAGED_FLOWS]++;
    struct ms_rule_ctr *rs = rule_stats.lookup(&slot);
    if (rs)
        rs->staged_flows++;
}

static __always_inline int drop(struct ms_counters *ctr, __u32 reason)
{
    if (reason == C_FRAG_NO_FIRST || reason == C_FRAG_OVERLAP || reason == C_FRAG_TINY)
        ctr->c[C_FRAGMENT_DROPS]++;
    if (reason < C_MAX)
        ctr->c[reason]++;
    return TC_ACT_SHOT;
}

/* With the packet's key: a live session under the live generation decides at once (the fast
 * path). Anything else (a new flow, a stale generation, an expired or reopened entry) is set
 * up in the scratch and goes to the judge by tail call. Per CPU scratch: a TC program runs to
 * completion on its CPU, so the entry cannot be overwritten between the programs. */
static __always_inline int session_path(struct __sk_buff *skb, struct ms_pkt *p,
                                        struct ms_sess_key *key, __u8 src_is_a, __u64 now,
                                        __u32 gen, struct ms_settings *st,
                                        struct ms_counters *ctr)
{
    __u32 zero = 0;
    __u32 len = skb->len;
    __u8 renew = 0, was_half = 0;
    struct ms_sess_val *s = sessions.lookup(key);
    if (s) {
        if (expired(s, st, now))
            renew = 1;
        else if (reopens(s, p))
            renew = 2;
        if (!renew && s->gen == gen) {
            ctr->c[C_SESSION_HITS]++;
            __u32 tr;
            int action = account(key, s, src_is_a, p->tcp_flags, p->dir, len, now, st, ctr, &tr);
            if (tr)
                count_transitions(ctr, tr);
            return action;
        }
        if (renew)
            was_half = half_open(s->tcp_state);
    }
    struct ms_scratch *sc = scratch.lookup(&zero);
    if (!sc)
        return drop(ctr, C_PRESSURE_DROPS);
    sc->key = *key;
    sc->p = *p;
    sc->jp = *p;
    sc->len = len;
    sc->src_is_a = src_is_a;
    sc->renew = renew;
    sc->was_half = was_half;
    sc->rejudge = s && !renew;
    /* a known flow is judged again as its first packet was, so the new set sees the flow in
     * its original direction */
    if (s && !renew)
        orig_packet(key, s, &sc->jp);
    slow_path.call(skb, SLOW_JUDGE);
    /* Only reached when the judge program is missing: fail closed. */
    return drop(ctr, C_PRESSURE_DROPS);
}

/* The fast path: parse, fragments, then the session table. ICMP errors go to ms_related. */
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
        /* Still cut short: a first fragment that does not hold its headers is a tiny one. */
        if (rc == PARSE_NEED_PULL)
            rc = p.frag == FRAG_FIRST ? PARSE_FRAG_TINY : MS_DROP_PARSE;
    }
    if (rc == MS_PASS_L2) {
        ctr->c[C_L2_PASSED]++;
        return TC_ACT_OK;
    }
    if (rc == PARSE_FRAG_TINY)
        return drop(ctr, C_FRAG_TINY);
    if (rc != PARSE_OK)
        return drop(ctr, C_PARSE_DROPS);

    struct ms_settings *st = settings.lookup(&zero);
    __u64 *actp = active.lookup(&zero);
    if (!st || !actp)
        return drop(ctr, C_PRESSURE_DROPS);
    __u64 now = bpf_ktime_get_coarse_ns();

    if (p.frag != FRAG_NONE) {
        struct ms_frag_key fk = {};
        fk.ifindex = skb->ifindex;
        fk.family = p.family;
        fk.proto = p.frag_proto;
        fk.id = p.frag_id;
        __builtin_memcpy(fk.src, p.src, 16);
        __builtin_memcpy(fk.dst, p.dst, 16);
        struct ms_frag_val *fv = frags.lookup(&fk);
        if (p.frag == FRAG_LATER) {
            if (!fv || (now > fv->first_seen && now - fv->first_seen > st->timeout_ns[MS_TO_FRAGMENT]))
                return drop(ctr, C_FRAG_NO_FIRST);
            if (p.frag_off < fv->l4_end)
                return drop(ctr, C_FRAG_OVERLAP);
            /* judged as a packet of the first fragment's flow */
            p.proto = fv->proto;
            p.sport = fv->sport;
            p.dport = fv->dport;
            p.tcp_flags = 0;
            ctr->c[C_FRAG_FOLLOWED]++;
        } else {
            /* A first fragment is judged by its own header, whatever came before with this key:
             * IP IDs wrap and repeat (NFS, DNS, tunnels). Later fragments follow the newest
             * first, so they go wherever it went: a denied first takes them down with it, and
             * no first that reaches the receiver was judged by other ports than its own. */
            struct ms_frag_val nv = {};
            nv.first_seen = now;
            nv.sport = p.sport;
            nv.dport = p.dport;
            nv.l4_end = p.frag_off;
            nv.proto = p.proto;
            if (frags.update(&fk, &nv) == 0)
                ctr->c[fv ? C_FRAG_REPLACED : C_FRAG_FIRST]++;
            else if (fv)
                /* the older first must not speak for this one's pieces: they find none */
                frags.delete(&fk);
        }
        p.icmp_err = 0; /* a fragmented ICMP error is judged by the policy */
    }

    struct ms_sess_key key = {};
    __u8 src_is_a = make_key(&p, skb->ifindex, &key);
    if (p.icmp_err) {
        struct ms_scratch *sc = scratch.lookup(&zero);
        if (!sc)
            return drop(ctr, C_PRESSURE_DROPS);
        sc->key = key;
        sc->p = p;
        sc->src_is_a = src_is_a;
        slow_path.call(skb, SLOW_RELATED);
        return drop(ctr, C_PRESSURE_DROPS);
    }
    return session_path(skb, &p, &key, src_is_a, now, *actp >> 1, st, ctr);
}

int ms_ingress(struct __sk_buff *skb)
{
    return classify(skb, MS_DIR_INGRESS);
}

int ms_egress(struct __sk_buff *skb)
{
    return classify(skb, MS_DIR_EGRESS);
}

/* An ICMP error whose quoted packet (inner IP header and 8 bytes of L4) belongs to a live
 * session judged allow or log under the live generation, and which goes back to the quoted
 * packet's sender. Anything else about it is left to the policy. */
static __always_inline int related(struct __sk_buff *skb, struct ms_pkt *op, __u32 gen,
                                   struct ms_settings *st, __u64 now)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u32 off = op->l4_off;
    if (off > MS_MAX_L4_OFF)
        return 0;
    off += 8;
    struct ms_pkt ip = {};
    ip.family = op->family;
    if (op->family == 4) {
        struct iphdr *in = data + off;
        if ((void *)(in + 1) > data_end)
            return 0;
        if (in->version != 4 || in->ihl < 5 || (in->frag_off & bpf_htons(0x1FFF)))
            return 0;
        ip.proto = in->protocol;
        ip.src[0] = in->saddr;
        ip.dst[0] = in->daddr;
        off += in->ihl * 4;
        if (op->dst[0] != ip.src[0])
            return 0;
    } else {
        struct ipv6hdr *in6 = data + off;
        if ((void *)(in6 + 1) > data_end)
            return 0;
        if (in6->version != 6)
            return 0;
        ip.proto = in6->nexthdr;
        __builtin_memcpy(ip.src, &in6->saddr, 16);
        __builtin_memcpy(ip.dst, &in6->daddr, 16);
        off += sizeof(struct ipv6hdr);
        if (op->dst[0] != ip.src[0] || op->dst[1] != ip.src[1] || op->dst[2] != ip.src[2] ||
            op->dst[3] != ip.src[3])
            return 0;
    }
    __u8 *l4 = data + off;
    if ((void *)(l4 + 8) > data_end)
        return 0;
    if (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP) {
        ip.sport = *(__u16 *)l4;
        ip.dport = *(__u16 *)(l4 + 2);
    } else if ((ip.proto == IPPROTO_ICMP && ip.family == 4 && (l4[0] == 8 || l4[0] == 0)) ||
               (ip.proto == IPPROTO_ICMPV6 && ip.family == 6 && (l4[0] == 128 || l4[0] == 129))) {
        ip.sport = *(__u16 *)(l4 + 4);
        ip.dport = ip.sport;
    }
    struct ms_sess_key k = {};
    make_key(&ip, skb->ifindex, &k);
    struct ms_sess_val *s = sessions.lookup(&k);
    if (!s || s->gen != gen || expired(s, st, now))
        return 0;
    return s->verdict == MS_ALLOW || s->verdict == MS_LOG;
}

/* ICMP errors: passed as related, else on through the session table like any packet. */
int ms_related(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct ms_counters *ctr = counters.lookup(&zero);
    if (!ctr)
        return TC_ACT_SHOT;
    struct ms_scratch *sc = scratch.lookup(&zero);
    __u64 *actp = active.lookup(&zero);
    struct ms_settings *st = settings.lookup(&zero);
    if (!sc || !actp || !st)
        return drop(ctr, C_PRESSURE_DROPS);
    struct ms_pkt p = sc->p;
    struct ms_sess_key key = sc->key;
    __u8 src_is_a = sc->src_is_a;
    if (p.dir != MS_DIR_INGRESS && p.dir != MS_DIR_EGRESS)
        return drop(ctr, C_PRESSURE_DROPS);
    __u32 gen = *actp >> 1;
    __u64 now = bpf_ktime_get_coarse_ns();
    if (related(skb, &p, gen, st, now)) {
        ctr->c[C_RELATED_PASSED]++;
        return TC_ACT_OK;
    }
    return session_path(skb, &p, &key, src_is_a, now, gen, st, ctr);
}

/* The tuple-space search alone (its loop is what the verifier's budget goes to): the verdict
 * of sc->jp by the active bank into sc->rv, then on to ms_record. Failsafe traffic is
 * decided first, before any rule of either view: allow, rule 0, the failsafe slot. */
int ms_judge(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct ms_counters *ctr = counters.lookup(&zero);
    if (!ctr)
        return TC_ACT_SHOT;
    struct ms_scratch *sc = scratch.lookup(&zero);
    __u64 *actp = active.lookup(&zero);
    struct ms_judging *jg = judging.lookup(&zero);
    struct ms_settings *st = settings.lookup(&zero);
    if (!sc || !actp || !jg || !st)
        return drop(ctr, C_PRESSURE_DROPS);
    /* Count in for the active bank, then read the active word again: the count is a full
     * barrier (a fetching atomic), so either the agent's wait after a flip sees this judge,
     * or this judge sees the flip and counts in for the new bank instead. */
    __u64 act = 0;
    __u32 bank = 0;
    __u64 *count = 0;
#pragma clang loop unroll(disable)
    for (int tries = 0; tries < 4; tries++) {
        act = *(volatile __u64 *)actp;
        bank = act & 1;
        /* a branch, not an index: the verifier keeps the pointer's bounds */
        __u64 *n = bank ? &jg->n[1] : &jg->n[0];
        if (__sync_fetch_and_add(n, 1) > (1ULL << 62))
            asm volatile("" ::: "memory"); /* the value is used: a fetching, ordered atomic */
        if (*(volatile __u64 *)actp == act) {
            count = n;
            break;
        }
        __sync_fetch_and_add(n, -1);
    }
    if (!count)
        return drop(ctr, C_PRESSURE_DROPS);
    struct ms_bank *bk = banks.lookup(&bank);
    if (!bk) {
        __sync_fetch_and_add(count, -1);
        return drop(ctr, C_PRESSURE_DROPS);
    }
    sc->gen = act >> 1;
    struct ms_pkt jp = sc->jp;
    struct ms_rule_val *rv = &sc->rv;
    if (failsafe(&jp, st)) {
        rv->score = rv->s_score = 0;
        rv->rule_id = rv->s_rule_id = 0;
        rv->slot = rv->s_slot = MS_FAILSAFE_SLOT;
        rv->action = rv->s_action = MS_ALLOW;
    } else {
        judge(&jp, bank, bk, rv, ctr);
    }
    if (__sync_fetch_and_add(count, -1) > (1ULL << 62))
        asm volatile("" ::: "memory");
    slow_path.call(skb, SLOW_RECORD);
    return drop(ctr, C_PRESSURE_DROPS);
}

/* After the judge: a live session takes its new verdict; a new flow gets its entry (replacing
 * an expired or finished one), unless the table is full. */
int ms_record(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct ms_counters *ctr = counters.lookup(&zero);
    if (!ctr)
        return TC_ACT_SHOT;
    struct ms_scratch *sc = scratch.lookup(&zero);
    struct ms_settings *st = settings.lookup(&zero);
    if (!sc || !st)
        return drop(ctr, C_PRESSURE_DROPS);
    struct ms_sess_key key = sc->key;
    __u8 src_is_a = sc->src_is_a;
    __u8 dir = sc->p.dir;
    __u8 flags = sc->p.tcp_flags;
    __u8 proto = sc->p.proto;
    __u32 len = sc->len;
    __u32 gen = sc->gen;
    struct ms_rule_val *rv = &sc->rv;
    if (dir != MS_DIR_INGRESS && dir != MS_DIR_EGRESS)
        return drop(ctr, C_PRESSURE_DROPS);
    __u64 now = bpf_ktime_get_coarse_ns();
    __u32 tr = 0;
    int action;

    __u8 sv = staged_of(rv);
    struct ms_sess_val nv = {};
    nv.first_seen = now;
    nv.gen = gen;
    nv.rule_id = rv->rule_id;
    nv.slot = rv->slot;
    nv.verdict = rv->action;
    nv.orig_dir = dir;
    nv.a_is_src = src_is_a;
    nv.staged_verdict = sv;
    if (sv != MS_NO_STAGED) {
        nv.staged_rule_id = rv->s_rule_id;
        nv.staged_slot = rv->s_slot;
    }
    if (sc->rejudge) {
        struct ms_sess_val *s = sessions.lookup(&key);
        if (s) {
            ctr->c[C_REJUDGED]++;
            /* a flow entering failsafe, or a staged difference of another rule, is a flow of
             * them from now on (counted as new ones are) */
            if (rv->slot == MS_FAILSAFE_SLOT && s->slot != MS_FAILSAFE_SLOT)
                ctr->c[C_FAILSAFE_FLOWS]++;
            if (sv != MS_NO_STAGED &&
                (s->staged_verdict == MS_NO_STAGED || s->staged_rule_id != nv.staged_rule_id))
                count_staged_flow(ctr, nv.staged_slot);
            if (rv->action != s->verdict || rv->rule_id != s->rule_id ||
                sv != s->staged_verdict || nv.staged_rule_id != s->staged_rule_id)
                s->ev_last = 0; /* report the flow afresh under its new verdicts */
            s->verdict = rv->action;
            s->rule_id = rv->rule_id;
            s->slot = rv->slot;
            s->staged_verdict = sv;
            s->staged_rule_id = nv.staged_rule_id;
            s->staged_slot = nv.staged_slot;
            s->gen = gen;
            action = account(&key, s, src_is_a, flags, dir, len, now, st, ctr, &tr);
            if (tr)
                count_transitions(ctr, tr);
            return action;
        }
        /* cleared meanwhile: this packet gets its flow's verdict, uncached (and is counted
         * as a new flow's) */
    }
    if (rv->slot == MS_FAILSAFE_SLOT)
        ctr->c[C_FAILSAFE_FLOWS]++;
    if (sv != MS_NO_STAGED)
        count_staged_flow(ctr, nv.staged_slot);
    if (sc->rejudge)
        return account(&key, &nv, src_is_a, flags, dir, len, now, st, ctr, &tr);

    /* A flow the full table turned away before: its events go on where they stopped. */
    struct ms_evlimit *el = 0;
    if (reported(nv.verdict, sv)) {
        el = evlimit.lookup(&key);
        if (el) {
            nv.ev_last = el->ev_last;
            nv.ev_pkts = el->ev_pkts;
            nv.ev_bytes = el->ev_bytes;
        }
    }
    /* Count the first packet (and send its event) in the new entry before inserting it, so
     * the insert is the only map operation on the way: no lookup after it. */
    action = account(&key, &nv, src_is_a, flags, dir, len, now, st, ctr, &tr);
    int syn = proto == IPPROTO_TCP && (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
    __u8 renew = sc->renew;
    if (renew) {
        /* The old entry ends here: removed by us (counted as renewed), or by the reaper
         * meanwhile (counted by it). bcc offers no BPF_EXIST update, and a plain update could
         * not tell a replace from an insert, which would cost active_sessions its exactness. */
        if (sessions.delete(&key) == 0) {
            ctr->c[renew == 1 ? C_RENEWED_EXPIRED : C_RENEWED_CLOSED]++;
            if (sc->was_half)
                ctr->c[C_HALF_OPEN_OUT]++;
        }
    }
    int err = sessions.insert(&key, &nv);
    if (err == 0) {
        if (el)
            evlimit.delete(&key);
        ctr->c[C_NEW_SESSIONS]++;
        if (syn)
            ctr->c[C_SYN_NEW]++;
        count_transitions(ctr, tr);
    } else if (err != -17) {
        /* -EEXIST: another CPU recorded the flow meanwhile (same verdict). Else the table is
         * full: this packet's verdict stands, and the flow's next packet is judged again. */
        ctr->c[C_SESSION_CREATE_FAILED]++;
        if (reported(nv.verdict, sv)) {
            struct ms_evlimit ev = {nv.ev_last, nv.ev_pkts, nv.ev_bytes};
            if (el)
                *el = ev;
            else
                evlimit.update(&key, &ev);
        }
    }
    return action;
}
