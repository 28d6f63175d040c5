"""Build and install desanet: the Python packages, the Cython aggregator, the CLI."""

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "cython_ext._aggregate",
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
    packages=["ebpf", "cython_ext", "meter", "shaper", "gateway", "benchmarks"],
    package_data={"ebpf": ["*.c", "*.h"], "gateway": ["*.service", "*.toml", "*.csv"]},
    ext_modules=cythonize(extensions, language_level=3),
    install_requires=[
        "pyroute2>=0.7.12,<0.10",
        "pyzmq>=25,<28",
        "msgpack>=1.0,<2",
        "numpy>=1.24,<3",
        "prometheus_client>=0.17,<1",
        "matplotlib>=3.6,<4",
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
    entry_points={"console_scripts": ["desanet=gateway.cli:main"]},
)
