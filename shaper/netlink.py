# Over 400 lines: the requests that write and the one-leaf read (`encode_leaf_get`) pack the same
# layouts, and the socket that carries them parses their answers; kept together so they cannot
# drift apart.
"""The rtnetlink traffic-control messages the shaper sends, and the socket that batches them.

pyroute2 names the protocol here (message types, flags), and its `tcmsg`
decoder is the reference the unit tests hold these messages against. The
messages themselves are packed with precomputed `struct` layouts: pyroute2's
generic message objects take about 240 us to encode one class, which alone
would make a 10,000-subscriber apply several times slower than `tc -batch`.
The socket sends hundreds of requests per system call and reads their
acknowledgements afterwards, so one apply costs a few dozen system calls.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from functools import lru_cache

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_ECHO,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.rtnl import (
    RTM_DELQDISC,
    RTM_DELTCLASS,
    RTM_GETQDISC,
    RTM_NEWQDISC,
    RTM_NEWTCLASS,
)

from desanet.errors import ShaperError
from desanet.shaper.tree import TC_H_ROOT, HtbClass, HtbRoot, LeafQdisc

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLM_F_DUMP_INTR = 0x10
NLMSGERR_ATTR_MSG = 1
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

TCA_KIND = 1
TCA_OPTIONS = 2
TCA_STATS2 = 7
TCA_STATS_BASIC = 1
TCA_STATS_QUEUE = 3
TCA_STATS_PKT64 = 8
TCA_HTB_PARMS = 1
TCA_HTB_INIT = 2
TCA_HTB_RATE64 = 6
TCA_HTB_CEIL64 = 7
HTB_VERSION = 3
TC_LINKLAYER_ETHERNET = 1

NLMSG_HDR = struct.Struct("=IHHII")
TCMSG = struct.Struct("=BxxxiIII")
NLA_HDR = struct.Struct("=HH")
RATESPEC = "BBHhHI"
HTB_OPT = struct.Struct("=" + RATESPEC + RATESPEC + "IIIII")
HTB_GLOB = struct.Struct("=IIIII")
U32 = struct.Struct("=I")
U64 = struct.Struct("=Q")

# Option name -> (attribute type, width in bytes) for the nested-attribute leaf kinds;
# the read-back decodes with the same tables.
LEAF_ATTRS: dict[str, dict[str, tuple[int, int]]] = {
    "fq_codel": {
        "target": (1, 4),
        "limit": (2, 4),
        "interval": (3, 4),
        "ecn": (4, 4),
        "flows": (5, 4),
        "quantum": (6, 4),
        "ce_threshold": (7, 4),
        "drop_batch_size": (8, 4),
        "memory_limit": (9, 4),
    },
    "cake": {
        "base_rate64": (2, 8),
        "diffserv_mode": (3, 4),
        "atm": (4, 4),
        "flow_mode": (5, 4),
        "overhead": (6, 4),
        "rtt": (7, 4),
        "target": (8, 4),
        "autorate": (9, 4),
        "memory": (10, 4),
        "nat": (11, 4),
        "raw": (12, 4),
        "wash": (13, 4),
        "mpu": (14, 4),
        "ingress": (15, 4),
        "ack_filter": (16, 4),
        "split_gso": (17, 4),
        "fwmark": (18, 4),
    },
}
# Options a kind accepts only when the qdisc is created, not in a change.
CREATE_ONLY = {"fq_codel": frozenset({"flows"})}


def _attr(kind: int, payload: bytes) -> bytes:
    length = NLA_HDR.size + len(payload)
    return NLA_HDR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _kind_attr(kind: str) -> bytes:
    return _attr(TCA_KIND, kind.encode() + b"\0")


_HTB_KIND = _kind_attr("htb")


def _message(
    msg_type: int, flags: int, ifindex: int, handle: int, parent: int, body: bytes
) -> bytes:
    # TcSocket.transact patches in the sequence number and, on a batch's last request, NLM_F_ACK.
    length = NLMSG_HDR.size + TCMSG.size + len(body)
    return (
        NLMSG_HDR.pack(length, msg_type, flags | NLM_F_REQUEST, 0, 0)
        + TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, 0)
        + body
    )


def encode_root_add(ifindex: int, root: HtbRoot) -> bytes:
    """Create the HTB root qdisc (replacing whatever root the device has)."""
    glob = HTB_GLOB.pack(HTB_VERSION, root.r2q, root.default_minor, 0, 0)
    body = _HTB_KIND + _attr(TCA_OPTIONS, _attr(TCA_HTB_INIT, glob))
    return _message(
        RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE, ifindex, root.handle, TC_H_ROOT, body
    )


def encode_root_probe(ifindex: int, kind: str) -> bytes:
    """Create a `kind` root qdisc with default settings (to learn whether the kernel has it)."""
    flags = NLM_F_CREATE | NLM_F_EXCL
    return _message(RTM_NEWQDISC, flags, ifindex, 0x10000, TC_H_ROOT, _kind_attr(kind))


def encode_root_delete(ifindex: int, handle: int) -> bytes:
    """Delete the root qdisc and with it the whole tree."""
    return _message(RTM_DELQDISC, 0, ifindex, handle, TC_H_ROOT, b"")


# A whole class request in one pack: headers, "htb" kind, options holding TCA_HTB_PARMS.
_CLASS_MSG = struct.Struct("=IHHII BxxxiIII HH4s HH HH " + RATESPEC + RATESPEC + "IIIII")


def _class_message(msg_type: int, flags: int, ifindex: int, cls: HtbClass) -> bytes:
    size = _CLASS_MSG.size
    return _CLASS_MSG.pack(
        size, msg_type, flags | NLM_F_REQUEST, 0, 0,
        socket.AF_UNSPEC, ifindex, cls.classid, cls.parent, 0,
        8, TCA_KIND, b"htb\0",
        size - 44, TCA_OPTIONS, 4 + HTB_OPT.size, TCA_HTB_PARMS,
        0, TC_LINKLAYER_ETHERNET, 0, 0, 0, cls.rate_bytes_ps,
        0, TC_LINKLAYER_ETHERNET, 0, 0, 0, cls.ceil_bytes_ps,
        cls.buffer_ticks, cls.cbuffer_ticks, cls.quantum, 0, cls.prio,
    )  # fmt: skip


def encode_class_add(ifindex: int, cls: HtbClass) -> bytes:
    """Create an HTB class (fails if it exists)."""
    return _class_message(RTM_NEWTCLASS, NLM_F_CREATE | NLM_F_EXCL, ifindex, cls)


def encode_class_change(ifindex: int, cls: HtbClass) -> bytes:
    """Change an existing HTB class's rates, bursts, quantum and prio in place."""
    return _class_message(RTM_NEWTCLASS, 0, ifindex, cls)


def encode_class_delete(ifindex: int, cls: HtbClass) -> bytes:
    """Delete an HTB class and its leaf qdisc."""
    return _message(RTM_DELTCLASS, 0, ifindex, cls.classid, cls.parent, b"")


@lru_cache(maxsize=4096)
def _leaf_body(kind: str, options: tuple[tuple[str, int], ...], creating: bool) -> bytes:
    # Cached: subscribers on the same plan tier share their leaf settings byte for byte.
    if kind == "pfifo":
        return _kind_attr(kind) + _attr(TCA_OPTIONS, U32.pack(dict(options)["limit"]))
    table = LEAF_ATTRS.get(kind)
    if table is None:
        raise ShaperError(f"cannot write a {kind} leaf qdisc")
    skip = frozenset() if creating else CREATE_ONLY.get(kind, frozenset())
    nested = b""
    for name, value in options:
        if name in skip:
            continue
        attr_type, width = table[name]
        nested += _attr(
            attr_type, (U64 if width == 8 else U32).pack(value & ((1 << width * 8) - 1))
        )
    return _kind_attr(kind) + _attr(TCA_OPTIONS, nested)


def encode_leaf_put(ifindex: int, leaf: LeafQdisc, creating: bool) -> bytes:
    """Create the leaf qdisc under its class, or change the one of the same kind and handle."""
    body = _leaf_body(leaf.kind, leaf.options, creating)
    flags = NLM_F_CREATE | NLM_F_REPLACE
    return _message(RTM_NEWQDISC, flags, ifindex, leaf.handle, leaf.parent, body)


def encode_leaf_delete(ifindex: int, leaf: LeafQdisc) -> bytes:
    """Delete a leaf qdisc (HTB puts its default pfifo back under the class)."""
    return _message(RTM_DELQDISC, 0, ifindex, leaf.handle, leaf.parent, b"")


def encode_leaf_get(ifindex: int, classid: int) -> bytes:
    """Ask for the one qdisc grafted under class `classid` (the kernel answers with just it).

    pyroute2's `tc("get-class", ...)` and its filtered dumps send a whole dump
    and filter in Python; a request without NLM_F_DUMP that names the parent
    class makes the kernel look up and report that single leaf. The kernel
    answers a qdisc get as a notification, sent back to the asker only with
    NLM_F_ECHO (it also reaches `tc monitor` listeners); NLM_F_ACK ends each
    answer, also when there is no qdisc to report (a class's built-in default
    leaf, which dumps leave out too).
    """
    return _message(RTM_GETQDISC, NLM_F_ECHO | NLM_F_ACK, ifindex, 0, classid, b"")


def iter_attrs(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each netlink attribute in data[start:end]."""
    while start + 4 <= end:
        length, kind = NLA_HDR.unpack_from(data, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, start + length
        start += (length + 3) & ~3


class TcSocket:
    """An rtnetlink socket for traffic control: batched requests with acks, and dumps.

    Opened in the calling thread's network namespace, it stays bound to that
    namespace for its whole life.
    """

    BATCH = 1024

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        # A batch of 1024 requests and its error replies must fit the socket buffers;
        # root may raise them past the sysctl limits (the FORCE variants).
        for opt, force in ((socket.SO_SNDBUF, SO_SNDBUFFORCE), (socket.SO_RCVBUF, SO_RCVBUFFORCE)):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, 4 << 20)
            except PermissionError:
                self._sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        self._sock.bind((0, 0))
        self._seq = 1

    def close(self) -> None:
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def transact(self, messages: Sequence[bytes]) -> list[tuple[int, str]]:
        """Send requests in batches; (errno, kernel message) per request, errno 0 = done.

        Only the last request of a batch asks for an acknowledgement: the
        kernel handles a batch in order inside the send call and reports every
        failure anyway, so that one ack marks the end of the batch and the
        failures before it arrive first. Stops after the first batch with a
        failure: later requests are reported as not sent (ECANCELED).
        """
        results: list[tuple[int, str]] = []
        for start in range(0, len(messages), self.BATCH):
            chunk = messages[start : start + self.BATCH]
            parts = []
            for msg in chunk:
                parts.append(msg[:8] + U32.pack(self._next_seq()) + msg[12:])
            first = U32.unpack_from(parts[0], 8)[0]
            last = parts[-1]
            flags = struct.unpack_from("=H", last, 6)[0] | NLM_F_ACK
            parts[-1] = last[:6] + struct.pack("=H", flags) + last[8:]
            self._sock.sendall(b"".join(parts))
            acks = self._collect_acks(first, len(chunk))
            results.extend(acks)
            if any(code for code, _ in acks):
                cancelled = (errno.ECANCELED, "not sent: an earlier request failed")
                results.extend([cancelled] * (len(messages) - len(results)))
                break
        return results

    def _collect_acks(self, first: int, count: int) -> list[tuple[int, str]]:
        acks = [(0, "")] * count
        while True:
            data = self._sock.recv(1 << 20)
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, msg_type, _, seq, _ = NLMSG_HDR.unpack_from(data, offset)
                if msg_type == NLMSG_ERROR:
                    index = (seq - first) & 0x7FFFFFFF
                    if index < count:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        acks[index] = (code, _ext_ack_message(data, offset, length, code))
                        if index == count - 1:
                            return acks
                offset += (length + 3) & ~3

    def get_many(self, requests: Sequence[bytes]) -> list[tuple[bytes, int, int] | int]:
        """Send get requests in batches; per request its reply (buffer, start, end) or an errno.

        Each request must ask for an acknowledgement, which ends its answer;
        an answer without an object (errno 0) or with an error gives the errno.
        The requests of a batch go in one system call and their answers are
        matched to them by sequence number.
        """
        results: list[tuple[bytes, int, int] | int] = []
        for start in range(0, len(requests), self.BATCH):
            chunk = requests[start : start + self.BATCH]
            first = (self._seq + 1) & 0x7FFFFFFF or 1
            self._sock.sendall(
                b"".join(msg[:8] + U32.pack(self._next_seq()) + msg[12:] for msg in chunk)
            )
            replies: list[tuple[bytes, int, int] | int] = [0] * len(chunk)
            pending = len(chunk)
            while pending:
                data = self._sock.recv(1 << 20)
                offset = 0
                while offset + NLMSG_HDR.size <= len(data):
                    length, msg_type, _, seq, _ = NLMSG_HDR.unpack_from(data, offset)
                    if length < NLMSG_HDR.size:
                        break
                    index = (seq - first) & 0x7FFFFFFF
                    if index < len(chunk):
                        if msg_type != NLMSG_ERROR:
                            replies[index] = (data, offset + NLMSG_HDR.size, offset + length)
                        else:
                            code = -struct.unpack_from("=i", data, offset + 16)[0]
                            if code:
                                replies[index] = code
                            pending -= 1
                    offset += (length + 3) & ~3
            results.extend(replies)
        return results

    def dump(self, msg_type: int, ifindex: int) -> list[bytes]:
        """Every message of a dump, as raw bytes (retried if the kernel says it was interrupted)."""
        for _ in range(5):
            seq = self._next_seq()
            request = NLMSG_HDR.pack(
                NLMSG_HDR.size + TCMSG.size, msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
            ) + TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, 0, 0)
            self._sock.sendall(request)
            chunks, interrupted = self._read_dump(seq)
            if not interrupted:
                return chunks
        raise ShaperError("the kernel's tc dump kept changing under us (5 attempts); try again")

    def _read_dump(self, seq: int) -> tuple[list[bytes], bool]:
        chunks: list[bytes] = []
        interrupted = False
        while True:
            data = self._sock.recv(1 << 20)
            chunks.append(data)
            offset = 0
            while offset + NLMSG_HDR.size <= len(data):
                length, msg_type, flags, msg_seq, _ = NLMSG_HDR.unpack_from(data, offset)
                if msg_seq == seq:
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    if msg_type == NLMSG_DONE:
                        return chunks, interrupted
                    if msg_type == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + 16)[0]
                        raise ShaperError(f"tc dump refused by the kernel: {os.strerror(code)}")
                offset += (length + 3) & ~3


def _ext_ack_message(data: bytes, offset: int, length: int, code: int) -> str:
    if code == 0:
        return ""
    # With NETLINK_CAP_ACK the error carries only the request's header; attributes follow it.
    start = offset + NLMSG_HDR.size + 4 + NLMSG_HDR.size
    for kind, begin, end in iter_attrs(data, start, offset + length):
        if kind == NLMSGERR_ATTR_MSG:
            text = bytes(data[begin:end]).rstrip(b"\0").decode(errors="replace")
            return f"{os.strerror(code)}: {text}"
    return os.strerror(code)


def iter_messages(chunks: Sequence[bytes], wanted_type: int) -> Iterator[tuple[bytes, int, int]]:
    """(buffer, start, end) of each message of `wanted_type` in dump chunks."""
    for data in chunks:
        offset = 0
        while offset + NLMSG_HDR.size <= len(data):
            length, msg_type, _, _, _ = NLMSG_HDR.unpack_from(data, offset)
            if length < NLMSG_HDR.size:
                break
            if msg_type == wanted_type:
                yield data, offset + NLMSG_HDR.size, offset + length
            offset += (length + 3) & ~3
