/* desanet_abi.h: everything the datapath and its Python side share.
 *
 * Included by the BPF programs and compiled by the ABI unit test; mirrored in
 * ebpf/abi.py, whose sizes and offsets that test checks against this file.
 * Change a struct here and in abi.py together, never one alone.
 */
#ifndef DESANET_ABI_H
#define DESANET_ABI_H

#include <linux/types.h>

/* Slot 0 collects traffic that matches no subscriber. */
#define DESANET_SLOT_UNMATCHED 0
/* Subscribers a datapath holds unless configured otherwise (slots 1..capacity). */
#define DESANET_DEFAULT_CAPACITY 65536
/* Prefixes per subscriber the LPM trie is sized for (capacity * this). */
#define DESANET_PREFIXES_PER_SUBSCRIBER 4

/* Map and program names, as pinned under <bpffs>/desanet/<gateway id>/<interface>/. */
#define DESANET_MAP_SUBSCRIBERS "subscribers" /* LPM trie: desanet_lpm_key -> __u32 slot */
#define DESANET_MAP_HOSTS "hosts"             /* hash: desanet_host_key -> __u32 slot (/32, /128) */
#define DESANET_MAP_COUNTERS "counters"       /* per-CPU array: slot -> desanet_counters */
#define DESANET_MAP_SLOTS "slots"             /* array: slot -> desanet_slot */
#define DESANET_MAP_SETTINGS "settings"       /* array[1]: desanet_settings */
#define DESANET_MAP_COUNTER_SUMS "counter_sums" /* mmapable array: slot -> desanet_counters, all CPUs */
#define DESANET_PROG_SUM_COUNTERS "sum_counters" /* counter_sums.bpf.c, run by BPF_PROG_TEST_RUN */
#define DESANET_MAP_MACS "macs"               /* hash: desanet_mac_key -> __u32 slot */
#define DESANET_MAP_GATEWAY_ADDRS "gateway_addrs" /* hash: desanet_host_key -> __u32 (1): the gateway's own */
#define DESANET_MAP_DROPS "drops"             /* array: drop reason -> desanet_drops */
#define DESANET_MAP_RTT_FLOWS "rtt_flows"     /* array: flow hash -> desanet_rtt_flow */
#define DESANET_MAP_RTT_SLOTS "rtt_slots"     /* mmapable array: slot -> desanet_rtt_hist */
#define DESANET_MAP_RTT_LINK "rtt_link"       /* mmapable array: dir * LINK_BUCKETS + ms -> __u64 */

/* MACs per subscriber the `macs` hash is sized for (capacity * this). */
#define DESANET_MACS_PER_SUBSCRIBER 4
/* Addresses of the gateway itself the datapath knows (all interfaces of its namespace). */
#define DESANET_GATEWAY_ADDRS_MAX 256

/* Passive RTT (the RTT section of ebpf/datapath.bpf.c). Directions: WAN = the subscriber's TSval echoed
 * from the internet (gateway -> internet -> gateway), LAN = the internet's
 * TSval echoed by the subscriber (gateway -> subscriber's device -> gateway). */
#define DESANET_RTT_WAN 0
#define DESANET_RTT_LAN 1
/* Entries of the direct-mapped flow table (2^DESANET_RTT_FLOWS_LOG2). */
#define DESANET_RTT_FLOWS_LOG2 17
#define DESANET_RTT_FLOWS 131072
/* Per-slot histogram: half-octave buckets of microseconds; bucket 0 is below
 * 768 us, bucket i >= 1 starts at (2 + (i + 18) % 2) << ((i + 18) / 2 - 1) us,
 * the last (from 1.57 s) is open-ended. abi.py computes the same bounds. */
#define DESANET_RTT_SLOT_BUCKETS 24
/* Link histogram: 1 ms buckets per direction, the last one open-ended (>= 2047 ms). */
#define DESANET_RTT_LINK_BUCKETS 2048

/* desanet_slot.flags */
#define DESANET_SLOT_BLOCKED 0x1 /* drop the subscriber's traffic (suspended, blocked) */
#define DESANET_SLOT_MAC_BOUND 0x2 /* its addresses are its only from its MACs (ingress) */

/* desanet_settings.flags */
#define DESANET_SETTING_BLOCK_UNPROVISIONED 0x1 /* drop forwarded traffic of no subscriber */

/* Why a packet was dropped: stable numbers, the index of the `drops` map,
 * mirrored by name in abi.py (DropReason). Never renumber; only add. */
#define DESANET_DROP_BLOCKED 1       /* the subscriber's slot is blocked (suspended) */
#define DESANET_DROP_UNPROVISIONED 2 /* no subscriber owns the address or MAC, policy block */
#define DESANET_DROP_MAC_MISMATCH 3  /* a MAC-bound subscriber's address from another MAC */
#define DESANET_DROP_REASONS 4       /* entries of the `drops` map (0 is unused) */

/* IPv4 and IPv6 share one trie: an IPv4 address is stored IPv4-mapped
 * (::ffff:a.b.c.d) with prefixlen + 96. */
struct desanet_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* A whole address (IPv4-mapped for IPv4). Host prefixes (/32, /128) live in
 * an exact-match hash: they are the longest possible match, and a hash lookup
 * costs the same at 1 and 65,536 subscribers where a trie walk does not. */
struct desanet_host_key {
	__u8 addr[16];
};

/* An Ethernet address: the subscriber's source MAC on ingress, destination on egress. */
struct desanet_mac_key {
	__u8 addr[6];
};

/* Dropped packets and their IP bytes, per drop reason (all CPUs, atomic adds:
 * drops are the slow path). */
struct desanet_drops {
	__u64 packets;
	__u64 bytes;
};

/* IP bytes (header + payload, no link layer) and packets, per slot and CPU.
 * A GSO super-packet counts as the packets it leaves as on the wire. */
struct desanet_counters {
	__u64 up_bytes;
	__u64 up_pkts;
	__u64 down_bytes;
	__u64 down_pkts;
};

/* What the shaper asks of a slot: the HTB classids to put in skb->priority
 * (0 = leave priority alone, the HTB default class takes it) and flags. */
struct desanet_slot {
	__u32 down_classid;
	__u32 up_classid;
	__u32 flags;
	__u32 reserved;
};

/* The context of one run of the summing program (counter_sums.bpf.c): it sums
 * slots from first_slot on and returns how many it summed. */
struct desanet_sum_run {
	__u64 first_slot;
};

/* One TCP flow as the RTT tracker keys it: the subscriber's side first, so
 * both directions of the flow find the same entry. 12 bytes, so the lookup
 * hashes one word group: IPv4 addresses whole, IPv6 addresses folded (the
 * XOR of their four words). Two IPv6 flows that fold alike share an entry;
 * a sample then needs a TSecr equal to the other's TSval, and is at worst one
 * wrong sample, never a wrong byte. Addresses and ports in network order. */
struct desanet_rtt_flow_key {
	__u32 sub_addr;
	__u32 remote_addr;
	__u16 sub_port;
	__u16 remote_port;
};

/* The outstanding timestamp of each direction of a flow, indexed by the RTT
 * direction its echo measures (DESANET_RTT_WAN: the subscriber's TSval).
 * t_ns 0 = none outstanding; seen = the last TSval the direction carried. */
struct desanet_rtt_flow {
	struct desanet_rtt_flow_key key; /* whose entry this is */
	__u32 reserved; /* always 0: the program compares key and it as two 64-bit words */
	__u32 tsval[2];
	__u32 seen[2];
	__u64 t_ns[2];
};

/* RTT samples of one slot: count[dir * DESANET_RTT_SLOT_BUCKETS + bucket],
 * cumulative, wrapping modulo 2^32 (readers take differences). */
struct desanet_rtt_hist {
	__u32 count[2 * DESANET_RTT_SLOT_BUCKETS];
};

/* Global settings, key 0. */
struct desanet_settings {
	__u32 upload_ifindex; /* IFB device carrying the upload HTB tree; 0 = none */
	__u32 flags;          /* DESANET_SETTING_* */
};

#endif /* DESANET_ABI_H */
