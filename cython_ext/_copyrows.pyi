"""Types of the compiled COPY row encoder (cython_ext/_copyrows.pyx)."""

COPY_SIGNATURE: bytes
COPY_TRAILER: bytes

def usage_rows(
    gw: str,
    epoch: str,
    seq: int,
    sub: list[str],
    t0: int,
    t1: int,
    columns: tuple[list[int], list[int], list[int], list[int], list[int], list[int]],
) -> bytes: ...
