/* desanet datapath: per-subscriber metering and HTB steering on the LAN interface.
 *
 * Attach: tc clsact of the LAN interface, direct-action. desanet_ingress sees
 * what subscribers send (up), desanet_egress what is sent to them (down).
 *
 * Per packet, in order:
 *   1. parse Ethernet, at most one in-band 802.1Q/802.1ad tag, then IPv4 or
 *      IPv6; anything else (ARP, other ethertypes, truncated headers) returns
 *      TC_ACT_OK untouched and uncounted;
 *   2. the subscriber-side address (source on ingress, destination on egress)
 *      gives the slot: first an exact-match hash of host addresses (/32,
 *      /128: the longest match there can be, at a cost flat in the number of
 *      subscribers), else one LPM-trie lookup; no match is slot 0;
 *   3. add the IP bytes (header + payload) and packets to the slot's per-CPU
 *      counters; a GSO/GRO super-packet counts as the packets it is on the wire;
 *   4. if the shaper gave the slot an HTB class, put it in skb->priority (HTB
 *      picks the class from it before any filter); a blocked slot is dropped
 *      here, before counting, so blocked traffic is never billed;
 *   5. ingress only, when an upload IFB is configured: return TC_ACT_UNSPEC,
 *      so that the next filter, `desanet_steer` with a mirred action, moves
 *      the packet to the IFB whose HTB tree shapes upload. bpf_redirect()
 *      would be shorter, but IFB drops what is not marked as redirected, and
 *      bpf_redirect() marks packets only since Linux 6.5 (Debian 12 ships 6.1);
 *      act_mirred marks them on every kernel.
 *
 * Cost: benchmarks/datapath.py (BPF_PROG_TEST_RUN, ns per packet over an empty
 * program). Settings are compile-time defines set by the loader (capacity, pin
 * directory); nothing edits this text.
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

#define VLAN_HLEN 4
#define ETH_P_8021Q_BE 0x0081  /* htons(ETH_P_8021Q) */
#define ETH_P_8021AD_BE 0xA888 /* htons(ETH_P_8021AD) */
#define ETH_P_IP_BE 0x0008     /* htons(ETH_P_IP) */
#define ETH_P_IPV6_BE 0xDD86   /* htons(ETH_P_IPV6) */

/* What parsing found: the subscriber-side address as a trie key, the IP bytes
 * the packet is on the wire, and how many packets that is. */
struct parsed {
	struct desanet_lpm_key key;
	__u64 ip_bytes;
	__u64 packets;
};

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
		p->ip_bytes = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
		l4_proto = ip6->nexthdr;
		l4_off = l3_off + sizeof(*ip6);
		hdr_len = sizeof(*ip6);
	} else {
		return -1;
	}

	if (skb->len < l3_off + hdr_len)
		return -1;
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

static __always_inline int account(struct __sk_buff *skb, int down)
{
	struct parsed p = {};
	__u32 slot = DESANET_SLOT_UNMATCHED;

	if (parse(skb, down, &p) < 0)
		return -1;
	__u32 *found = hosts.lookup((struct desanet_host_key *)p.key.addr);
	if (!found)
		found = subscribers.lookup(&p.key);
	if (found && *found < SLOTS)
		slot = *found;

	struct desanet_slot *cfg = slots.lookup(&slot);
	if (cfg) {
		if (cfg->flags & DESANET_SLOT_BLOCKED)
			return -2;
		__u32 classid = down ? cfg->down_classid : cfg->up_classid;
		if (classid)
			skb->priority = classid;
	}

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
