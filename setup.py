"""Build and install desanet: the Python packages, the Cython aggregator, the CLI."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# The card's folders stay at the top of the tree; installed, they are subpackages of
# `desanet` (desanet/<name> links to ../<name>), so no import name can collide with
# another distribution's `gateway` or `benchmarks`.
LAYERS = ("ebpf", "cython_ext", "meter", "shaper", "gateway", "benchmarks")

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
    version="0.1.0",
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
        "matplotlib>=3.6,<4",
        "nats-py[nkeys]>=2.6,<3",
    ],
    extras_require={
        "postgres": ["psycopg[binary]>=3.1,<4"],
        "dev": [
            "cython>=3.0,<4",
            "pytest>=7,<10",
            "hypothesis>=6.80,<7",
            "ruff>=0.5,<1",
            "mypy>=1.8,<3",
            "psycopg[binary]>=3.1,<4",
            "virtme-ng>=1.25,<2",
        ],
    },
    entry_points={"console_scripts": ["desanet=desanet.gateway.cli:main"]},
)
