"""The kernel side of desanet: the BPF datapath, its ABI mirror and the loader."""
