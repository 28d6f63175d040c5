"""The aggregator hot path in Cython and its pure-Python/numpy twin.

`load_backend()` returns the module the operator chose with the environment
variable DESANET_AGGREGATOR: "cython" (the default, built by `make setup`) or
"python" (cython_ext.twin). Both expose `Aggregator` and `sum_cpus` with the
same signatures and identical results. A missing build is an error, never a
silent switch to the slower twin.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from desanet.errors import DesanetError

ENV_VAR = "DESANET_AGGREGATOR"
BACKENDS = {"cython": "desanet.cython_ext._aggregate", "python": "desanet.cython_ext.twin"}


def load_backend(name: str | None = None) -> ModuleType:
    """The aggregator module named by `name`, else by $DESANET_AGGREGATOR, else Cython."""
    choice = name if name is not None else os.environ.get(ENV_VAR, "cython")
    if choice not in BACKENDS:
        raise DesanetError(
            f"{ENV_VAR}={choice!r} is not an aggregator backend; use one of {sorted(BACKENDS)}"
        )
    try:
        return importlib.import_module(BACKENDS[choice])
    except ImportError as err:
        raise DesanetError(
            f"the {choice} aggregator is not built ({err}); run `make setup`, "
            f"or set {ENV_VAR}=python to run the slower numpy twin on purpose"
        ) from err
