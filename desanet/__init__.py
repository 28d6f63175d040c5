"""desanet, the edge engine of village cooperative ISPs.

This package is the bottom layer every other one stands on: the error
hierarchy, units, validation of ids and endpoints, durable file writes and the
clock. It imports nothing of the project. Its subpackages (`desanet.ebpf`,
`desanet.meter`, ...) live in the top-level folders of the source tree.
"""

__version__ = "0.1.0"
