/* Over 400 lines: BCC rewrites map calls in the main source file only, so the RTT tracker cannot
 * live in a header of its own. */
/* desanet datapath: per-subscriber metering and HTB steering on the LAN interface.
 *
 * Attach: tc clsact of the LAN interface, direct-action. desanet_ingress sees
 * what subscribers send (up), desanet_egress what is sent to them (down).
 *
 * Per packet, in order:
 *   1. parse Ethernet, at most one in-band 802.1Q/802.1ad tag, then IPv4 or
 *      IPv6; anything else (ARP, other ethertypes, truncated headers) returns
 *      TC_ACT_OK untouched and uncounted: non-IP is link-local and always
 *      works, whatever the policy;
 *   2. the subscriber-side address (source on ingress, destination on egress)
 *      gives the slot: first an exact-match hash of host addresses (/32,
 *      /128: the longest match there can be, at a cost flat in the number of
 *      subscribers), else one LPM-trie lookup;
 *   3. no address match: the subscriber-side MAC (source on ingress,
 *      destination on egress) gives the slot from the `macs` hash, so a
 *      subscriber given by MAC is followed to whatever address its device
 *      picks (DHCP lease, SLAAC, privacy addresses); link-local and
 *      unspecified addresses (DHCP discover, ND) are not followed; still no
 *      match is slot 0;
 *   4. the rules, each with a drop reason counted in `drops` (stable numbers,
 *      desanet_abi.h): a MAC-bound slot's address from another MAC on ingress
 *      (MAC_MISMATCH), slot 0 when the policy blocks unprovisioned traffic
 *      (UNPROVISIONED), a blocked slot (BLOCKED). Traffic between a device and
 *      the gateway itself passes every rule (DHCP, DNS, ND, the console) and
 *      is counted in slot 0, billed to nobody. Only these slow paths ask
 *      whether a packet is the gateway's own, so a subscriber's packet pays
 *      nothing for the rules but one flags test;
 *   5. add the IP bytes (header + payload) and packets to the slot's per-CPU
 *      counters; a GSO/GRO super-packet counts as the packets it is on the wire;
 *   6. if the shaper gave the slot an HTB class, put it in skb->priority (HTB
 *      picks the class from it before any filter; slot 0's class is the
 *      policy's wall or bounded share);
 *   7. ingress only, when an upload IFB is configured: return TC_ACT_UNSPEC,
 *      so that the next filter, `desanet_steer` with a mirred action, moves
 *      the packet to the IFB whose HTB tree shapes upload. bpf_redirect()
 *      would be shorter, but IFB drops what is not marked as redirected, and
 *      bpf_redirect() marks packets only since Linux 6.5 (Debian 12 ships 6.1);
 *      act_mirred marks them on every kernel;
 *   8. a TCP packet with the timestamp option (counted, not dropped) feeds
 *      the passive RTT tracker (the RTT section below): its TSval is remembered, its
 *      TSecr may answer the other direction's, and an answer is one sample in
 *      the slot's and the link's histograms (WAN RTT on egress, LAN RTT on
 *      ingress). Compiled out with DESANET_RTT_TRACK 0.
 *
 * "The gateway itself": on ingress the destination, on egress the source, is
 * one of the gateway's own addresses (the `gateway_addrs` hash, which the
 * loader fills from every interface of the gateway's namespace), or it is
 * link-scoped (IPv6 link-local or multicast, IPv4 broadcast or multicast, a
 * group destination MAC), which a router never forwards. Neither the packet
 * type nor the ifindex of __sk_buff tells: a forwarded packet arrives
 * addressed to the gateway's MAC (PACKET_HOST) on the same interface as a
 * local one, and the routing decision is made after tc ingress; the address
 * is what UAPI alone can see.
 *
 * Cost: benchmarks/datapath.py (BPF_PROG_TEST_RUN, ns per packet over an empty
 * program; the RTT tracker's cost on TCP packets with timestamps beside the
 * program without it). Settings are compile-time defines set by the loader
 * (capacity, pin directory, RTT tracking); nothing edits this text.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "desanet_abi.h"

#ifndef DESANET_CAPACITY
#error "DESANET_CAPACITY must be defined by the loader"
#endif
#ifndef DESANET_PIN_DIR
#error "DESANET_PIN_DIR must be defined by the loader"
#endif

#define SLOTS (DESANET_CAPACITY + 1)
#define PREFIXES (DESANET_CAPACITY * DESANET_PREFIXES_PER_SUBSCRIBER)

BPF_TABLE_PINNED("lpm_trie", struct desanet_lpm_key, __u32, subscribers, PREFIXES,
		 DESANET_PIN_DIR "/" DESANET_MAP_SUBSCRIBERS, BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct desanet_host_key, __u32, hosts, PREFIXES,
		 DESANET_PIN_DIR "/" DESANET_MAP_HOSTS);
BPF_TABLE_PINNED("percpu_array", __u32, struct desanet_counters, counters, SLOTS,
		 DESANET_PIN_DIR "/" DESANET_MAP_COUNTERS);
BPF_TABLE_PINNED("array", __u32, struct desanet_slot, slots, SLOTS,
		 DESANET_PIN_DIR "/" DESANET_MAP_SLOTS);
BPF_TABLE_PINNED("array", __u32, struct desanet_settings, settings, 1,
		 DESANET_PIN_DIR "/" DESANET_MAP_SETTINGS);
BPF_TABLE_PINNED("hash", struct desanet_mac_key, __u32, macs,
		 DESANET_CAPACITY * DESANET_MACS_PER_SUBSCRIBER,
		 DESANET_PIN_DIR "/" DESANET_MAP_MACS);
BPF_TABLE_PINNED("hash", struct desanet_host_key, __u32, gateway_addrs, DESANET_GATEWAY_ADDRS_MAX,
		 DESANET_PIN_DIR "/" DESANET_MAP_GATEWAY_ADDRS);
BPF_TABLE_PINNED("array", __u32, struct desanet_drops, drops, DESANET_DROP_REASONS,
		 DESANET_PIN_DIR "/" DESANET_MAP_DROPS);

#define VLAN_HLEN 4
#define ETH_P_8021Q_BE 0x0081  /* htons(ETH_P_8021Q) */
#define ETH_P_8021AD_BE 0xA888 /* htons(ETH_P_8021AD) */
#define ETH_P_IP_BE 0x0008     /* htons(ETH_P_IP) */
#define ETH_P_IPV6_BE 0xDD86   /* htons(ETH_P_IPV6) */

/* What parsing found: the subscriber-side address as a trie key, the IP bytes
 * the packet is on the wire, how many packets that is, and where the network
 * header starts (for the slow paths, which read the other address again). */
struct parsed {
	struct desanet_lpm_key key;
	__u64 ip_bytes;
	__u64 packets;
	__u32 l3_off;
	__u32 l4_off;
	__u32 ipv6;
	__u8 l4_proto;
};

/* Passive round-trip times from TCP timestamps (step 8 above).
 *
 * The pping method: a TCP packet carrying the timestamp option (RFC 7323)
 * leaves its TSval and the time it was first seen; the first packet of the
 * other direction whose TSecr echoes that TSval gives one RTT sample, and the
 * timestamp is forgotten. Per flow direction at most one timestamp is
 * outstanding (a flow costs one entry of a fixed table and never floods it), a TSval
 * is recorded only the first time it is seen (duplicates and retransmissions
 * carry one already seen), and an echo that has moved past the outstanding
 * TSval drops it unmatched (that TSval was lost or never echoed exactly).
 * Flows without timestamps cost one test of the option bytes.
 *
 * Where the samples are taken decides what they measure. Both hooks run before
 * the qdisc of their direction:
 *   - WAN RTT: a subscriber's TSval seen at LAN ingress, echoed from the
 *     internet at LAN egress: desanet's upload queue, the uplink, the far
 *     end and the modem's download queue; not desanet's own download queue;
 *   - LAN RTT: the internet's TSval seen at LAN egress, echoed by the
 *     subscriber at LAN ingress: desanet's download queue and the village
 *     LAN (WiFi) to the device and back.
 * Packets of the gateway's own sockets (skb->sk at egress: the console,
 * DNS over TCP) are skipped, so the gateway's talk with a device is never
 * taken for the internet.
 *
 * Only the option layout RFC 7323 appendix A recommends, NOP NOP TS first, is
 * read (what Linux, Windows, macOS, iOS and Android send on every segment
 * after the handshake): one compare instead of an option walk. Handshake
 * segments (MSS first) are therefore not timed.
 *
 * Samples go to two histograms, both plain arrays the reader maps into its
 * memory: per slot and direction in half-octave buckets (desanet_abi.h), and
 * link-wide per direction in 1 ms buckets. Samples are rare (at most one per
 * flow direction per RTT), so an atomic add on a shared array costs less than
 * per-CPU copies of 12 MB would. The two directions of a flow may run on two
 * CPUs at once; a race there can lose or skew one sample, never a counter.
 *
 * DESANET_RTT_TRACK 0 compiles rtt_track() to nothing (the maps still exist,
 * so readers work and see no samples). It lives in this file, not a header of
 * its own, because BCC rewrites map calls (`rtt_flows.lookup`) in the main
 * source file only.
 */
#ifndef DESANET_RTT_TRACK
#error "DESANET_RTT_TRACK must be defined by the loader (0 or 1)"
#endif

BPF_TABLE_PINNED("array", __u32, struct desanet_rtt_flow, rtt_flows, DESANET_RTT_FLOWS,
		 DESANET_PIN_DIR "/" DESANET_MAP_RTT_FLOWS);
BPF_TABLE_PINNED("array", __u32, struct desanet_rtt_hist, rtt_slots, SLOTS,
		 DESANET_PIN_DIR "/" DESANET_MAP_RTT_SLOTS, BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, __u64, rtt_link, 2 * DESANET_RTT_LINK_BUCKETS,
		 DESANET_PIN_DIR "/" DESANET_MAP_RTT_LINK, BPF_F_MMAPABLE);

/* NOP, NOP, kind 8 (timestamps), length 10: the first option word, network order. */
#define RTT_TS_WORD_BE 0x0a080101

#if DESANET_RTT_TRACK

/* Index of the most significant set bit of v (v > 0), without a loop. */
static __always_inline __u32 rtt_log2(__u32 v)
{
	__u32 r = 0, s;
	s = (v > 0xFFFF) << 4; v >>= s; r |= s;
	s = (v > 0xFF) << 3;   v >>= s; r |= s;
	s = (v > 0xF) << 2;    v >>= s; r |= s;
	s = (v > 0x3) << 1;    v >>= s; r |= s;
	return r | (v >> 1);
}

/* The per-slot bucket of a sample of `us` microseconds: half octaves from 768 us. */
static __always_inline __u32 rtt_slot_bucket(__u32 us)
{
	if (us < 768)
		return 0;
	__u32 l = rtt_log2(us);
	__u32 b = 2 * l + ((us >> (l - 1)) & 1) - 18;
	return b < DESANET_RTT_SLOT_BUCKETS ? b : DESANET_RTT_SLOT_BUCKETS - 1;
}

static __always_inline void rtt_sample(__u32 slot, __u32 dir, __u64 rtt_ns)
{
	__u64 ms = rtt_ns / 1000000;
	__u32 link = dir * DESANET_RTT_LINK_BUCKETS +
		     (ms < DESANET_RTT_LINK_BUCKETS ? ms : DESANET_RTT_LINK_BUCKETS - 1);
	__u64 *n = rtt_link.lookup(&link);
	if (n)
		lock_xadd(n, 1);
	struct desanet_rtt_hist *h = rtt_slots.lookup(&slot);
	if (h) {
		__u64 us = rtt_ns / 1000;
		__u32 i = dir * DESANET_RTT_SLOT_BUCKETS +
			  rtt_slot_bucket(us < 0xFFFFFFFF ? us : 0xFFFFFFFF);
		/* clang folds the bucket's clamp into copies the verifier cannot follow:
		 * the barrier makes it check the index it is given. */
		asm volatile("" : "+r"(i));
		if (i < 2 * DESANET_RTT_SLOT_BUCKETS)
			lock_xadd(&h->count[i], 1);
	}
}

/* Time one TCP packet of `slot` (parse() found it; `down`: at egress). */
static __always_inline void rtt_track(struct __sk_buff *skb, int down, __u32 slot,
				      struct parsed *p)
{
	if (p->l4_proto != IPPROTO_TCP)
		return;
	if (down) {
		/* The gateway's own socket: not the internet's echo. BPF_PROG_TEST_RUN
		 * hands the program a stand-in socket with no port; a real one has one. */
		struct bpf_sock *sk = skb->sk;
		if (sk && sk->src_port)
			return;
	}
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* parse() bounded l4_off; the verifier needs the bound stated here. */
	__u32 off = p->l4_off;
	if (off > 18 + 60)
		return;
	struct tcphdr *tcp = data + off;
	__u32 *opt = (void *)(tcp + 1);
	if ((void *)(opt + 3) > data_end || tcp->doff < 8)
		return;
	if (opt[0] != RTT_TS_WORD_BE)
		return;
	__u32 tsval = bpf_ntohl(opt[1]);
	__u32 tsecr = bpf_ntohl(opt[2]);

	/* The key and the entry's reserved word (always 0) as two 64-bit words: one
	 * compare each for "is this entry this flow's", where four fields took four. */
	union {
		struct {
			struct desanet_rtt_flow_key key;
			__u32 reserved;
		};
		__u64 w[2];
	} k = {};
	if (p->ipv6) {
		struct ipv6hdr *ip6 = data + p->l3_off;
		if ((void *)(ip6 + 1) > data_end)
			return;
		__u32 *sub = down ? ip6->daddr.in6_u.u6_addr32 : ip6->saddr.in6_u.u6_addr32;
		__u32 *remote = down ? ip6->saddr.in6_u.u6_addr32 : ip6->daddr.in6_u.u6_addr32;
		k.key.sub_addr = sub[0] ^ sub[1] ^ sub[2] ^ sub[3];
		k.key.remote_addr = remote[0] ^ remote[1] ^ remote[2] ^ remote[3];
	} else {
		struct iphdr *ip = data + p->l3_off;
		if ((void *)(ip + 1) > data_end)
			return;
		k.key.sub_addr = down ? ip->daddr : ip->saddr;
		k.key.remote_addr = down ? ip->saddr : ip->daddr;
	}
	k.key.sub_port = down ? tcp->dest : tcp->source;
	k.key.remote_port = down ? tcp->source : tcp->dest;

	/* This packet's TSval waits at index `mine`; its TSecr may answer `echo`. */
	const __u32 mine = down ? DESANET_RTT_LAN : DESANET_RTT_WAN;
	const __u32 echo = down ? DESANET_RTT_WAN : DESANET_RTT_LAN;
	/* A direct-mapped table: the flow's hash picks its one entry, which holds
	 * the key to tell whose it is; a new flow takes the entry over. An array
	 * lookup is a few inlined instructions where a hash map's costs 25 ns. */
	__u64 mixed = (k.w[0] ^ (k.w[1] << 17)) * 0x9E3779B97F4A7C15ull;
	__u32 h = mixed >> (64 - DESANET_RTT_FLOWS_LOG2);
	struct desanet_rtt_flow *f = rtt_flows.lookup(&h);
	if (!f)
		return; /* cannot happen: h < DESANET_RTT_FLOWS; the verifier needs the check */
	__u64 *held = (__u64 *)&f->key;
	if (held[0] != k.w[0] || held[1] != k.w[1]) {
		f->key = k.key;
		f->tsval[echo] = 0;
		f->seen[echo] = 0;
		f->t_ns[echo] = 0;
		f->tsval[mine] = tsval;
		f->seen[mine] = tsval;
		f->t_ns[mine] = bpf_ktime_get_ns();
		return;
	}
	if (tsecr && f->t_ns[echo]) {
		__s32 ahead = tsecr - f->tsval[echo];
		if (ahead == 0) {
			rtt_sample(slot, echo, bpf_ktime_get_ns() - f->t_ns[echo]);
			f->t_ns[echo] = 0;
		} else if (ahead > 0) {
			f->t_ns[echo] = 0; /* echoes moved past it: never timed */
		}
	}
	if (tsval != f->seen[mine]) {
		f->seen[mine] = tsval;
		if (!f->t_ns[mine]) {
			f->tsval[mine] = tsval;
			f->t_ns[mine] = bpf_ktime_get_ns();
		}
	}
}

#else

static __always_inline void rtt_track(struct __sk_buff *skb, int down, __u32 slot,
				      struct parsed *p)
{
}

#endif /* DESANET_RTT_TRACK */


/* Header bytes repeated in every segment of a GSO packet beyond the first:
 * the IP header plus the TCP or UDP header. Returns 0 if it cannot tell. */
static __always_inline __u32 l4_header_len(struct __sk_buff *skb, __u32 l4_off, __u8 proto)
{
	if (proto == IPPROTO_UDP)
		return 8;
	if (proto == IPPROTO_TCP) {
		__u8 doff_byte;
		/* bpf_skb_load_bytes works on non-linear data, which GSO headers need not be. */
		if (bpf_skb_load_bytes(skb, l4_off + 12, &doff_byte, 1) < 0)
			return 0;
		return (doff_byte >> 4) * 4;
	}
	return 0;
}

/* Parse one frame. `dst` chooses the subscriber-side address (egress: destination).
 * Returns 0 and fills `p`, or -1 for frames that are not countable IP. */
static __always_inline int parse(struct __sk_buff *skb, int dst, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 l3_off = sizeof(*eth);
	__u16 proto;

	if (data + sizeof(*eth) > data_end)
		return -1;
	proto = eth->h_proto;
	if (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
		/* One in-band tag; the tag's own ethertype field follows its TCI. */
		__be16 *inner = data + sizeof(*eth) + 2;
		if ((void *)(inner + 1) > data_end)
			return -1;
		proto = *inner;
		l3_off += VLAN_HLEN;
	}

	__u32 hdr_len = 0;
	__u8 l4_proto;
	__u32 l4_off;

	if (proto == ETH_P_IP_BE) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > data_end)
			return -1;
		__u32 ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip))
			return -1;
		p->key.prefixlen = 128;
		__builtin_memset(p->key.addr, 0, 10);
		p->key.addr[10] = 0xff;
		p->key.addr[11] = 0xff;
		__builtin_memcpy(&p->key.addr[12], dst ? &ip->daddr : &ip->saddr, 4);
		/* tot_len, not skb->len: Ethernet padding of short frames is not IP. */
		p->ip_bytes = bpf_ntohs(ip->tot_len);
		l4_proto = ip->protocol;
		l4_off = l3_off + ihl;
		hdr_len = ihl;
	} else if (proto == ETH_P_IPV6_BE) {
		struct ipv6hdr *ip6 = data + l3_off;
		if ((void *)(ip6 + 1) > data_end)
			return -1;
		p->key.prefixlen = 128;
		__builtin_memcpy(p->key.addr, dst ? &ip6->daddr : &ip6->saddr, 16);
		p->ipv6 = 1;
		p->ip_bytes = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		l4_proto = ip6->nexthdr;
		l4_off = l3_off + sizeof(*ip6);
		hdr_len = sizeof(*ip6);
	} else {
		return -1;
	}

	if (skb->len < l3_off + hdr_len)
		return -1;
	p->l3_off = l3_off;
	p->l4_off = l4_off;
	p->l4_proto = l4_proto;
	__u32 l3_len = skb->len - l3_off;
	if (skb->gso_size) {
		/* A super-packet (its length field may be 0 or stale): the wire sees
		 * every segment with its own IP and L4 header. gso_segs is 0 when a
		 * device left it for the stack to compute. */
		__u32 hdrs = hdr_len + l4_header_len(skb, l4_off, l4_proto);
		__u64 segs = skb->gso_segs;
		if (segs == 0 && l3_len > hdrs)
			segs = (l3_len - hdrs + skb->gso_size - 1) / skb->gso_size;
		if (segs == 0)
			segs = 1;
		p->ip_bytes = l3_len + (segs - 1) * hdrs;
		p->packets = segs;
	} else {
		/* A length beyond the frame is a truncated packet the stack drops. */
		if (p->ip_bytes > l3_len || p->ip_bytes < hdr_len)
			return -1;
		p->packets = 1;
	}
	return 0;
}

/* The slot of the subscriber-side MAC (source on ingress, destination on
 * egress), or 0 when no subscriber has it. */
static __always_inline __u32 mac_slot(struct __sk_buff *skb, int down)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct desanet_mac_key key;

	/* parse() checked the Ethernet header, but the verifier needs it again here. */
	if (data + sizeof(struct ethhdr) > data_end)
		return 0;
	__builtin_memcpy(key.addr, down ? data : data + ETH_ALEN, ETH_ALEN);
	__u32 *slot = macs.lookup(&key);
	return slot && *slot < SLOTS ? *slot : 0;
}

/* Whether the subscriber-side address (IPv4-mapped for IPv4) is one no device is
 * reached by beyond this link: IPv6 link-local or unspecified, IPv4 0.0.0.0.
 * Such packets (DHCP discover, ND, MLD) are the device's talk with the gateway,
 * not its traffic: they are not followed by MAC, so not billed to its slot. */
static __always_inline int link_scoped(const __u8 *addr)
{
	if (addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80)
		return 1;
	/* A first byte of 0 and a last four of 0: IPv6 :: and IPv4 0.0.0.0 (::ffff:0.0.0.0);
	 * nothing a device is reached by looks like that (unicast is 2000::/3, fc00::/7). */
	__u32 low = addr[12] | addr[13] | addr[14] | addr[15];
	return addr[0] == 0 && low == 0;
}

/* Whether the packet is between a device and the gateway itself: on ingress
 * its destination, on egress its source, is the gateway's own or link-scoped
 * (see the top of this file). */
static __always_inline int is_local(struct __sk_buff *skb, int down, struct parsed *p)
{
	struct desanet_host_key peer = {};

	if (!down) {
		__u8 dst_mac0;
		/* The group bit: broadcast and multicast frames are never routed on. */
		if (bpf_skb_load_bytes(skb, 0, &dst_mac0, 1) < 0)
			return 0;
		if (dst_mac0 & 1)
			return 1;
	}
	if (p->ipv6) {
		/* daddr at 24, saddr at 8 of the IPv6 header */
		if (bpf_skb_load_bytes(skb, p->l3_off + (down ? 8 : 24), peer.addr, 16) < 0)
			return 0;
		if (peer.addr[0] == 0xff && !down)
			return 1; /* multicast: ND, MLD, DHCPv6 */
		if (peer.addr[0] == 0xfe && (peer.addr[1] & 0xc0) == 0x80)
			return 1; /* link-local fe80::/10: the gateway's own link */
	} else {
		/* saddr at 12, daddr at 16 of the IPv4 header */
		if (bpf_skb_load_bytes(skb, p->l3_off + (down ? 12 : 16), &peer.addr[12], 4) < 0)
			return 0;
		if (!down && ((peer.addr[12] & 0xf0) == 0xe0 ||
			      (peer.addr[12] & peer.addr[13] & peer.addr[14] & peer.addr[15]) == 0xff))
			return 1; /* multicast 224/4, limited broadcast (DHCP) */
		peer.addr[10] = 0xff;
		peer.addr[11] = 0xff;
	}
	return gateway_addrs.lookup(&peer) != NULL;
}

static __always_inline void count_drop(__u32 reason, struct parsed *p)
{
	struct desanet_drops *d = drops.lookup(&reason);
	if (d) {
		/* A shared (not per-CPU) array: drops are rare, an atomic add is cheap there. */
		lock_xadd(&d->packets, p->packets);
		lock_xadd(&d->bytes, p->ip_bytes);
	}
}

/* Returns 0 for a counted packet, -1 for one not counted (not IP), -2 for a drop. */
static __always_inline int account(struct __sk_buff *skb, int down)
{
	struct parsed p = {};
	__u32 slot = DESANET_SLOT_UNMATCHED;
	__u32 reason = 0;

	if (parse(skb, down, &p) < 0)
		return -1;
	__u32 *found = hosts.lookup((struct desanet_host_key *)p.key.addr);
	if (!found)
		found = subscribers.lookup(&p.key);
	if (found && *found < SLOTS)
		slot = *found;
	else if (!link_scoped(p.key.addr))
		slot = mac_slot(skb, down);

	struct desanet_slot *cfg = slots.lookup(&slot);
	if (!cfg)
		return -1; /* cannot happen: slot < SLOTS; the verifier needs the check */
	if (cfg->flags) {
		if (cfg->flags & DESANET_SLOT_BLOCKED)
			reason = DESANET_DROP_BLOCKED;
		/* Only an address match can mismatch: a MAC match is the MAC itself. */
		if (!down && found && (cfg->flags & DESANET_SLOT_MAC_BOUND) &&
		    mac_slot(skb, down) != slot)
			reason = DESANET_DROP_MAC_MISMATCH;
	}
	if (slot == DESANET_SLOT_UNMATCHED) {
		__u32 zero = 0;
		struct desanet_settings *s = settings.lookup(&zero);
		if (s && (s->flags & DESANET_SETTING_BLOCK_UNPROVISIONED))
			reason = DESANET_DROP_UNPROVISIONED;
	}
	if (reason) {
		if (!is_local(skb, down, &p)) {
			count_drop(reason, &p);
			return -2;
		}
		/* To or from the gateway itself: carried, and billed to nobody. */
		slot = DESANET_SLOT_UNMATCHED;
		cfg = slots.lookup(&slot);
		if (!cfg)
			return -1;
	}

	__u32 classid = down ? cfg->down_classid : cfg->up_classid;
	if (classid)
		skb->priority = classid;

	struct desanet_counters *c = counters.lookup(&slot);
	if (c) {
		/* Per-CPU value and tc runs with preemption off: plain adds are safe. */
		if (down) {
			c->down_bytes += p.ip_bytes;
			c->down_pkts += p.packets;
		} else {
			c->up_bytes += p.ip_bytes;
			c->up_pkts += p.packets;
		}
	}
	rtt_track(skb, down, slot, &p);
	return 0;
}

int desanet_egress(struct __sk_buff *skb)
{
	if (account(skb, 1) == -2)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

int desanet_ingress(struct __sk_buff *skb)
{
	int verdict = account(skb, 0);

	if (verdict == -2)
		return TC_ACT_SHOT;
	if (verdict < 0)
		return TC_ACT_OK;
	__u32 zero = 0;
	struct desanet_settings *s = settings.lookup(&zero);
	if (s && s->upload_ifindex)
		return TC_ACT_UNSPEC; /* on to desanet_steer */
	return TC_ACT_OK;
}

/* Attached without direct-action after desanet_ingress, with a mirred redirect
 * to the upload IFB: -1 means "matched, use the filter's class", which runs
 * the action. It only sees what desanet_ingress passed on. */
int desanet_steer(struct __sk_buff *skb)
{
	return -1;
}

/* The baseline the benchmark subtracts: attach cost with no work at all. */
int desanet_empty(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}
