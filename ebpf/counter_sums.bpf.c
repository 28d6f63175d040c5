/* desanet counter sums: every slot's per-CPU counters added up inside the kernel.
 *
 * Attach: nowhere. The loader (ebpf/counter_sums.py) compiles this when it
 * attaches the datapath and pins it, as `sum_counters`, with its sums array
 * `counter_sums` beside the datapath's maps. A reader opens the pins and runs
 * the program with BPF_PROG_TEST_RUN, which needs no BCC and no compiler.
 *
 * Per run, from the slot named in the context (struct desanet_sum_run):
 *   1. for each slot, at most DESANET_SUM_CHUNK of them: read the slot's
 *      counters on every CPU with bpf_map_lookup_percpu_elem and add them up
 *      (each u64 is read whole; the sums wrap modulo 2^64 as the counters do);
 *   2. store the four sums in `counter_sums`, an mmapable array that the
 *      reader maps into its memory: nothing is copied out through a syscall;
 *   3. return how many slots it summed. It stops early at the end of the map,
 *      and at a slot it cannot read on some CPU, which the reader reports.
 * bpf_loop would sum the whole map in one run, but BCC 0.26 does not relocate
 * the callback address bpf_loop takes. The verifier walks a bounded loop
 * iteration by iteration instead, so the loader picks DESANET_SUM_CHUNK to keep
 * its pending branches (one or two per CPU and slot) under the verifier's limit.
 *
 * Cost: benchmarks/aggregate.py ("of which read ms"): 1.3 ms per 65,536 slots
 * on 2 CPUs with the reader's copy out, where the bpf_loop form took 1.45 ms.
 * Settings are compile-time defines set by the loader (slots, CPUs, chunk, pin
 * directory, the counters map); nothing edits this text.
 */
#include <uapi/linux/bpf.h>

#include "desanet_abi.h"

#ifndef DESANET_SLOTS
#error "DESANET_SLOTS must be defined by the loader"
#endif
#ifndef DESANET_NR_CPUS
#error "DESANET_NR_CPUS must be defined by the loader"
#endif
#ifndef DESANET_SUM_CHUNK
#error "DESANET_SUM_CHUNK must be defined by the loader"
#endif
#ifndef DESANET_PIN_DIR
#error "DESANET_PIN_DIR must be defined by the loader"
#endif
#ifndef DESANET_COUNTERS_FD
#error "DESANET_COUNTERS_FD must be defined by the loader"
#endif

BPF_TABLE_PINNED("array", __u32, struct desanet_counters, counter_sums, DESANET_SLOTS,
		 DESANET_PIN_DIR "/" DESANET_MAP_COUNTER_SUMS, BPF_F_MMAPABLE);

int desanet_sum_counters(struct desanet_sum_run *run)
{
	/* BCC has no syntax that hands one of its maps to bpf_map_lookup_percpu_elem,
	 * so the loader passes the pinned counters map by file descriptor and the
	 * program refers to it the way BCC's own rewriting does (BPF_PSEUDO_MAP_FD). */
	void *counters = (void *)bpf_pseudo_fd(1, DESANET_COUNTERS_FD);
	__u32 first = run->first_slot;
	__u32 i;

	/* Not unrolled: the verifier walks every iteration anyway, and unrolled
	 * copies would only make the program longer. */
#pragma clang loop unroll(disable)
	for (i = 0; i < DESANET_SUM_CHUNK; i++) {
		__u32 slot = first + i;
		struct desanet_counters sum = {};
		__u32 cpu;

		/* A few CPUs per step: fully unrolled for many CPUs, clang spills past
		 * the 512-byte BPF stack. */
#pragma clang loop unroll_count(4)
		for (cpu = 0; cpu < DESANET_NR_CPUS; cpu++) {
			struct desanet_counters *c = bpf_map_lookup_percpu_elem(counters, &slot, cpu);

			if (!c)
				return i; /* past the last slot, or a CPU without a value */
			sum.up_bytes += c->up_bytes;
			sum.up_pkts += c->up_pkts;
			sum.down_bytes += c->down_bytes;
			sum.down_pkts += c->down_pkts;
		}
		struct desanet_counters *out = counter_sums.lookup(&slot);
		if (!out)
			return i;
		*out = sum;
	}
	return i;
}
