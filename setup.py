"""Build and install desanet: the Python packages, the Cython aggregator, the CLI."""

import ast
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# The card's folders stay at the top of the tree; installed, they are subpackages of
# `desanet` (desanet/<name> links to ../<name>), so no import name can collide with
# another distribution's `gateway` or `benchmarks`.
LAYERS = ("ebpf", "cython_ext", "meter", "shaper", "gateway", "benchmarks")

# Extras: only the demo draws a picture (a gateway needs no plotting library), and only
# the collector's PostgreSQL store needs psycopg (its SQLite store is in the standard library).
DEMO = ["matplotlib>=3.6,<4"]
POSTGRES = ["psycopg[binary]>=3.1,<4"]


def read_version() -> str:
    """`__version__` of desanet/__init__.py, the one place the version is written."""
    tree = ast.parse((Path(__file__).parent / "desanet" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return str(ast.literal_eval(node.value))
    raise SystemExit("desanet/__init__.py defines no __version__")


extensions = [
    Extension(
        "desanet.cython_ext._aggregate",
        ["cython_ext/_aggregate.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="desanet",
    version=read_version(),
    description="Edge engine for village cooperative ISPs: eBPF metering, HTB shaping, billing",
    python_requires=">=3.11",
    packages=["desanet", *(f"desanet.{p}" for p in LAYERS)],
    package_data={
        "desanet": ["py.typed"],
        "desanet.ebpf": ["*.c", "*.h"],
        "desanet.cython_ext": ["*.pyi"],
        "desanet.gateway": ["*.service", "*.toml", "*.csv"],
    },
    ext_modules=cythonize(extensions, language_level=3),
    install_requires=[
        "pyroute2>=0.7.12,<0.10",
        "pyzmq>=25,<28",
        "msgpack>=1.0,<2",
        "numpy>=1.24,<3",
        "prometheus_client>=0.17,<1",
        "pyrad>=2.6,<3",
    ],
    extras_require={
        "postgres": POSTGRES,
        "demo": DEMO,
        "dev": [
            *DEMO,
            *POSTGRES,
            "cython>=3.0,<4",
            "pytest>=7,<10",
            "hypothesis>=6.80,<7",
            "ruff>=0.5,<1",
            "mypy>=1.8,<3",
            "virtme-ng>=1.25,<2",
        ],
    },
    entry_points={"console_scripts": ["desanet=desanet.gateway.cli:main"]},
)
