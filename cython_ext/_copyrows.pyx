# cython: boundscheck=False, wraparound=False, initializedcheck=False
"""PostgreSQL binary COPY tuples of one usage message's subscriber rows, in one pass.

The hub collector COPYs every subscriber row of every message; building the
rows as Python tuples and handing them to psycopg one by one cost more than
PostgreSQL's work on them. This writes the COPY tuples of a whole message
into one bytes object: (gw, epoch, seq, sub, t0, t1, up, down, up_pkts,
down_pkts, up_total, down_total) as text, text, int8, text, int8 x 8, the
columns of the hub's usage and snapshots tables (meter/fleet_store.py). The
stream's signature and trailer are COPY_SIGNATURE and COPY_TRAILER.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from desanet.errors import StreamError

COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * 8  # no flags, no header extension
COPY_TRAILER = b"\xff\xff"

cdef int FIELDS = 12
cdef int VALUES = 6  # up, down, up_pkts, down_pkts, up_total, down_total
# Field count, 12 lengths, 9 int8 values (seq, t0, t1 and the 6 columns).
cdef Py_ssize_t FIXED = 2 + 12 * 4 + 9 * 8


cdef inline char* put32(char* p, int32_t v) noexcept:
    cdef uint32_t u = <uint32_t>v
    p[0] = <char>((u >> 24) & 0xFF)
    p[1] = <char>((u >> 16) & 0xFF)
    p[2] = <char>((u >> 8) & 0xFF)
    p[3] = <char>(u & 0xFF)
    return p + 4


cdef inline char* put64(char* p, int64_t v) noexcept:
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[i] = <char>((u >> (56 - 8 * i)) & 0xFF)
    return p + 8


cdef inline char* put_int8(char* p, int64_t v) noexcept:
    return put64(put32(p, 8), v)


cdef inline char* put_text(char* p, const char* s, Py_ssize_t n) noexcept:
    p = put32(p, <int32_t>n)
    memcpy(p, s, n)
    return p + n


cdef int64_t as_int8(object value, str name) except? -1:
    try:
        return <int64_t>value
    except (OverflowError, TypeError):
        raise StreamError(f"usage message: {name} value {value!r} is not a 64-bit integer")


def usage_rows(
    str gw,
    str epoch,
    object seq,
    list sub,
    object t0,
    object t1,
    tuple columns,
):
    """The COPY tuples of one message's rows; `columns` the 6 value lists, each as long as sub."""
    cdef Py_ssize_t n = len(sub), i, gw_n, epoch_n, sub_n, total
    cdef const char* gw_s = PyUnicode_AsUTF8AndSize(gw, &gw_n)
    cdef const char* epoch_s = PyUnicode_AsUTF8AndSize(epoch, &epoch_n)
    cdef const char* sub_s
    cdef int64_t seq_v = as_int8(seq, "seq"), t0_v = as_int8(t0, "t0"), t1_v = as_int8(t1, "t1")
    if len(columns) != VALUES:
        raise StreamError(f"usage message: {len(columns)} value columns, not {VALUES}")
    cdef list c0 = columns[0], c1 = columns[1], c2 = columns[2]
    cdef list c3 = columns[3], c4 = columns[4], c5 = columns[5]
    for col in columns:
        if len(col) != n:
            raise StreamError("usage message: a value column is not as long as sub")
    total = n * (FIXED + gw_n + epoch_n)
    for i in range(n):
        PyUnicode_AsUTF8AndSize(sub[i], &sub_n)
        total += sub_n
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    for i in range(n):
        sub_s = PyUnicode_AsUTF8AndSize(sub[i], &sub_n)
        p[0] = 0
        p[1] = <char>FIELDS
        p += 2
        p = put_text(p, gw_s, gw_n)
        p = put_text(p, epoch_s, epoch_n)
        p = put_int8(p, seq_v)
        p = put_text(p, sub_s, sub_n)
        p = put_int8(p, t0_v)
        p = put_int8(p, t1_v)
        p = put_int8(p, as_int8(c0[i], "up"))
        p = put_int8(p, as_int8(c1[i], "down"))
        p = put_int8(p, as_int8(c2[i], "up_pkts"))
        p = put_int8(p, as_int8(c3[i], "down_pkts"))
        p = put_int8(p, as_int8(c4[i], "up_total"))
        p = put_int8(p, as_int8(c5[i], "down_total"))
    return out
