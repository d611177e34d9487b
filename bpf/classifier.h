/* Shared layouts of the microseg classifier: maps' keys and values and the flow event.
 *
 * streamer/datapath/layout.py says every define, counter and struct here again, under the same
 * names; tests/test_layout.py parses this file and compiles it (gcc) and fails on any
 * difference, so change both together and bump MS_LAYOUT_VERSION whenever a pinned map's
 * layout changes (the agent then starts fresh maps instead of adopting ones it cannot read).
 */
#ifndef MICROSEG_CLASSIFIER_H
#define MICROSEG_CLASSIFIER_H

#define MS_LAYOUT_VERSION 6

/* Verdicts: the same numbers as streamer.datapath.reference.Verdict. */
#define MS_ALLOW 0
#define MS_DENY 1
#define MS_LOG 2
#define MS_PASS_L2 3
#define MS_DROP_PARSE 4
#define MS_DROP_FRAGMENT 5
#define MS_PASS_RELATED 6 /* an ICMP error quoting a packet of a live allowed flow */
#define MS_DROP_PRESSURE 7 /* a resource the verdict needs failed: never fail open */

/* A flow's staged verdict (contract §6) when the staged view decides as the enforced one. */
#define MS_NO_STAGED 0xff

/* Per-rule counter slots: 0 is the default action's, 1 failsafe traffic's; rules from 2. */
#define MS_DEFAULT_SLOT 0
#define MS_FAILSAFE_SLOT 1

/* Failsafe entries (ms_settings.failsafe) the classifier holds. */
#define MS_MAX_FAILSAFE 16

#define MS_DIR_INGRESS 1
#define MS_DIR_EGRESS 2

/* Per-CPU counters, one struct per CPU (index 0 of `counters`). Every packet increments
 * exactly one of ALLOWED, DENIED, LOGGED, L2_PASSED, PARSE_DROPS, FRAGMENT_DROPS,
 * RELATED_PASSED, PRESSURE_DROPS (what it became). */
enum ms_counter {
    /* the first two cache lines hold what every packet of a known flow counts */
    C_TOTAL = 0,
    C_ALLOWED,         /* passed by an allow verdict */
    C_DENIED,          /* dropped by a deny verdict (drop reason "policy") */
    C_LOGGED,          /* passed by a log verdict */
    C_BYTES_TOTAL,
    C_SESSION_HITS,
    C_POLICY_HITS,     /* new or re-judged flows decided by a rule */
    C_POLICY_MISSES,   /* ... decided by the default action */
    /* [8 + (dir-1)*4 + verdict] for verdict ALLOW/DENY/LOG: packets by direction and verdict */
    C_DIR_VERDICT = 8,
    C_NEW_SESSIONS = 16, /* entries put in the session table (renewals included) */
    C_PARSE_DROPS,     /* drop reason "parse" */
    C_FRAGMENT_DROPS,  /* drop reason "fragment": no first, overlapping, tiny */
    C_L2_PASSED,       /* ARP, IPv6 neighbour discovery, link-local MLD */
    C_EVENTS_SENT,
    C_EVENTS_LOST,     /* ring buffer full */
    C_REJUDGED,        /* sessions judged again after a policy change */
    C_SHAPE_PROBES,    /* hash probes of the tuple-space search */
    C_SESSION_CREATE_FAILED, /* new flows judged without a session: the table was full */
    C_CLOSED_SESSIONS, /* TCP sessions that reached TIME_WAIT or CLOSED (FIN both ways, RST) */
    C_RENEWED_EXPIRED, /* idle-expired entries a new flow replaced on the datapath */
    C_RENEWED_CLOSED,  /* TIME_WAIT/CLOSED entries a new SYN replaced */
    C_RELATED_PASSED = 28, /* ICMP errors passed as part of a live allowed flow */
    C_SYN_NEW,         /* new sessions whose first packet was a SYN without ACK */
    C_HALF_OPEN_IN,    /* sessions that entered SYN_SENT/SYN_RECV ... */
    C_HALF_OPEN_OUT,   /* ... and that left them on the datapath */
    C_FRAG_FIRST,      /* first fragments remembered where no first of their key was */
    C_FRAG_FOLLOWED,   /* later fragments that found their first */
    C_FRAG_NO_FIRST,   /* later fragments with no (live) remembered first: dropped */
    C_FRAG_OVERLAP,    /* later fragments overlapping their first's L4 header */
    C_FRAG_TINY,       /* first fragments too short to hold their L4 header */
    C_PRESSURE_DROPS,  /* drop reason "pressure": a map or the judge program failed */
    C_FRAG_REPLACED,   /* first fragments remembered in the place of an older first of their
                        * key (an IP ID reused, a retransmission, one past its timeout) */
    C_FAILSAFE_PASSED, /* packets of failsafe flows (passed before any rule) */
    C_FAILSAFE_FLOWS,  /* new flows that a failsafe entry passed */
    C_STAGED_FLOWS,    /* new or re-judged flows whose staged verdict differs from the enforced */
    C_MAX = 48,
};

/* TCP session states (ms_sess_val.tcp_state); 0 for other protocols and flags-less TCP. */
#define MS_TCP_NONE 0
#define MS_TCP_SYN_SENT 1
#define MS_TCP_SYN_RECV 2
#define MS_TCP_ESTABLISHED 3
#define MS_TCP_FIN_WAIT 4
#define MS_TCP_CLOSE_WAIT 5
#define MS_TCP_LAST_ACK 6
#define MS_TCP_TIME_WAIT 7
#define MS_TCP_CLOSED 8

/* Timeout classes (ms_sess_val.tclass): index into ms_settings.timeout_ns. TCP uses its state. */
#define MS_TO_UDP 9
#define MS_TO_UDP_STREAM 10 /* a UDP flow that has seen a reply */
#define MS_TO_ICMP 11
#define MS_TO_OTHER 12
#define MS_TO_FRAGMENT 13   /* how long a first fragment's ports are remembered */
#define MS_TO_MAX 16

struct ms_counters {
    __u64 c[C_MAX];
};

/* Session table key: direction independent. Endpoint "a" is the lower (address, port) pair,
 * so both directions of a flow find the same entry. IPv4 addresses sit in word 0. */
struct ms_sess_key {
    __u32 ifindex;
    __u8 family; /* 4 or 6 */
    __u8 proto;
    __u16 pad;
    __u32 a[4];
    __u32 b[4];
    __u16 aport; /* network byte order */
    __u16 bport;
};

/* One session. Both directions of a flow use it, and on real traffic they run on different
 * CPUs (a veth's ingress on the sender's, egress on the replier's). So the entry is laid out in
 * cache lines by writer: the first 32 bytes share a line with the key's tail and are read by
 * every packet but written only when a value really changes (last_seen moves once a coarse
 * clock tick, flags and states rarely); each direction's counters have a line of their own.
 * This assumes the kernel's hash element layout (48-byte header, 44-byte key rounded to 48:
 * the value starts at byte 96 of a 256-byte element, elements page aligned); were it other,
 * only the speed would change. */
struct ms_sess_val {
    __u64 last_seen; /* ktime (coarse) ns */
    __u32 gen;       /* policy generation the verdict was taken under */
    __u32 rule_id;   /* 0: the default action decided */
    __u32 slot;      /* per-rule counter slot (0: default action) */
    __u8 verdict;
    __u8 orig_dir;  /* MS_DIR_* of the flow's first packet */
    __u8 a_is_src;  /* endpoint a sent the first packet */
    __u8 tcp_state; /* MS_TCP_* */
    __u8 tcp_flags; /* union of flags seen */
    __u8 tclass;    /* timeout class: MS_TCP_* state or MS_TO_* */
    __u8 fins;      /* 1: originator sent FIN, 2: reply sent FIN, 4: the first FIN was a reply's */
    __u8 staged_verdict; /* MS_ALLOW/DENY/LOG by the staged view, or MS_NO_STAGED */
    __u32 staged_rule_id; /* the staged view's rule (0: its default action) */
    /* written by the originator's packets (and, for deny/log flows, the event state) */
    __u64 pkts_orig;
    __u64 bytes_orig;
    __u64 first_seen;
    __u64 ev_last;  /* when the last event of this flow was sent (ktime ns) */
    __u64 ev_pkts;  /* since then */
    __u64 ev_bytes;
    __u32 staged_slot; /* counter slot of the staged view's rule (read only when staged) */
    __u32 pad2;
    __u64 pad2b;
    /* written by the replies */
    __u64 pkts_reply;
    __u64 bytes_reply;
    __u64 pad3[6];
};

/* Remembered first fragments (an LRU: under a flood old ones go, and their later fragments
 * are dropped as having no first, never passed). proto is the IPv4 protocol field or the
 * IPv6 fragment header's next header: the same in every fragment of a datagram. */
struct ms_frag_key {
    __u32 ifindex;
    __u8 family;
    __u8 proto;
    __u16 pad;
    __u32 id;       /* IPv4: the 16-bit identification; IPv6: the fragment header's */
    __u32 src[4];
    __u32 dst[4];
};

struct ms_frag_val {
    __u64 first_seen; /* ktime (coarse) ns */
    __u16 sport;      /* network byte order, as in ms_pkt */
    __u16 dport;
    __u16 l4_end;     /* end of the L4 header from the fragmentable part's start, in bytes */
    __u8 proto;       /* the L4 protocol the first fragment carried */
    __u8 pad;
};

/* Written by userspace only (the kernel never reads it): removals it made from the session
 * and fragment tables, so active = new_sessions - renewed - removed stays exact. */
struct ms_reaped {
    __u64 expired;    /* idle sessions past their timeout */
    __u64 closed;     /* TIME_WAIT/CLOSED sessions past their linger */
    __u64 half_open;  /* of those two, sessions that were SYN_SENT/SYN_RECV */
    __u64 cleared;    /* removed by clear_sessions */
    __u64 frags;      /* fragment entries past their timeout or cleared */
    __u64 reserved[3];
};

/* Tuple-space search. A shape is one combination of masks; all rules of a shape live in one
 * hash table keyed by the masked packet fields. IPv4 and IPv6 have tables of their own so the
 * common IPv4 key stays 16 bytes (cheap to hash). */
struct ms_rule_key4 {
    __u16 shape;  /* the shape's key_shape: bank * MS_MAX_SHAPES + its id */
    __u8 dir;     /* MS_DIR_* */
    __u8 proto;   /* 0 when the shape's protocol is a wildcard */
    __u16 sport;  /* masked, network byte order */
    __u16 dport;
    __u32 src;    /* masked, network byte order */
    __u32 dst;
};

struct ms_rule_key6 {
    __u16 shape;
    __u8 dir;
    __u8 proto;
    __u16 sport;
    __u16 dport;
    __u32 src[4];
    __u32 dst[4];
};

/* A key's two winners: the enforced view's (the best enforce-mode rule) and the staged view's
 * (the best rule of either mode, as if all were enforced). Where no staged rule wins, the two
 * halves are the same rule; with no staged rule in the policy they always are. */
struct ms_rule_val {
    __u64 score;   /* 1 + (priority << 34 | action rank << 32 | ~rule_id): higher wins; 0: none */
    __u32 rule_id;
    __u32 slot;
    __u8 action;   /* MS_ALLOW / MS_DENY / MS_LOG */
    __u8 pad[7];
    __u64 s_score; /* the staged view's winner, as above (>= score) */
    __u32 s_rule_id;
    __u32 s_slot;
    __u8 s_action;
    __u8 s_pad[7];
};

struct ms_shape {
    __u32 src_mask[4]; /* network byte order; IPv4 uses word 0 */
    __u32 dst_mask[4];
    __u16 sport_mask;  /* network byte order */
    __u16 dport_mask;
    __u8 proto_mask;   /* 0xff, or 0 when the protocol is a wildcard in this shape */
    __u8 bloom_shift;  /* 64 - log2(bloom bits); 0: the shape has no filter, always probe */
    __u8 pad[2];
    __u64 max_score;   /* the best stored score of any rule in the shape */
    __u32 bloom_off;   /* the shape's first word in `blooms` (its bank's base included) */
    __u32 key_shape;   /* `shape` in its rules' keys: bank * MS_MAX_SHAPES + the shape's id, which
                        * stays while its place in the probe order (by max_score) moves */
};

/* Bloom filters: one per shape, a power of two of bits, in the words of `blooms`; bank b owns
 * words [b * MS_BLOOM_BANK_WORDS, (b + 1) * MS_BLOOM_BANK_WORDS). A key whose bit is clear is
 * certainly not in the shape's table, so the (often cache-cold) hash probe is skipped. The
 * hash (ms_mix over the masked key's words, then ms_ports_word, as judge_family in
 * classifier.c computes it) is mirrored by key_hash in streamer/datapath/compiler.py: keep them
 * equal (were they not, the filters would hide rules that match, which the kernel tests see). */
#define MS_BLOOM_BANK_WORDS (1 << 19)

/* One per bank. The active bank and generation are read from `active` in one 8-byte load. */
struct ms_bank {
    __u32 gen;
    __u32 nshapes4;
    __u32 nshapes6;
    __u8 default_action; /* MS_ALLOW or MS_DENY */
    __u8 staged_default; /* the staged view's default: default_action, unless the agent stages
                          * everything (--policy-mode staged: default_action is then allow) */
    __u8 pad[2];
};

/* Judges in flight per CPU (`judging`, a per-CPU array of one): a judge counts itself in for the
 * bank it reads before it reads any of the bank's tables, and out once done, so the agent can
 * tell when no judge reads a bank any more without waiting for an RCU grace period. */
struct ms_judging {
    __u64 n[2]; /* by bank */
};

/* One failsafe entry: flows whose first packet crosses in `dir` with `proto` and destination
 * `port`, from (in) or to (out) a remote address in addr/mask, pass before any rule. */
struct ms_failsafe {
    __u8 family;  /* 4 or 6; 0: either (addr and mask are then 0) */
    __u8 proto;
    __u8 dir;     /* MS_DIR_INGRESS (in) or MS_DIR_EGRESS (out) */
    __u8 pad;
    __u16 port;   /* network byte order */
    __u16 pad1;
    __u32 addr[4]; /* the remote end, masked, network byte order; IPv4 uses word 0 */
    __u32 mask[4];
};

struct ms_settings {
    __u64 event_interval_ns; /* at most one event per flow per interval after its first */
    __u64 timeout_ns[MS_TO_MAX]; /* idle timeouts by class: TCP states 0-8, then MS_TO_* */
    __u32 nfailsafe;              /* entries of `failsafe` in use */
    __u32 pad;
    struct ms_failsafe failsafe[MS_MAX_FAILSAFE];
};

struct ms_rule_ctr {
    __u64 packets;
    __u64 bytes;
    __u64 last_hit; /* ktime (coarse) ns */
    __u64 staged_packets; /* what the rule decided in the staged view (where that differs) */
    __u64 staged_bytes;
    __u64 staged_flows;
};

#define MS_EV_NEW 1
#define MS_EV_UPDATE 2

struct ms_event {
    __u64 ts;       /* ktime ns */
    __u64 packets;  /* since the flow's previous event (1 for a new flow) */
    __u64 bytes;
    __u32 ifindex;
    __u32 rule_id;
    __u32 gen;
    __u8 family;
    __u8 proto;
    __u8 direction; /* of the flow's first packet */
    __u8 verdict;
    __u32 src[4];   /* the flow's originator */
    __u32 dst[4];
    __u16 sport;    /* host byte order */
    __u16 dport;
    __u8 tcp_flags;
    __u8 kind;      /* MS_EV_* */
    __u8 staged_verdict; /* as in ms_sess_val: MS_NO_STAGED when the views agree */
    __u8 pad;
    __u32 staged_rule_id;
    __u32 pad2;
};

#endif
