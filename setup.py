"""Build and install desanet: the Python packages, the Cython aggregator, the CLI."""

import ast
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

CATALOGS = Path("gateway/console/translations")

# The card's folders stay at the top of the tree; installed, they are subpackages of
# `desanet` (desanet/<name> links to ../<name>), so no import name can collide with
# another distribution's `gateway` or `benchmarks`.
LAYERS = ("ebpf", "cython_ext", "meter", "shaper", "gateway", "benchmarks")
SUBPACKAGES = ("gateway.console",)

# The operator's web console (`desanet console`): framework, forms and CSRF, catalogs,
# password hashing, a WSGI server with TLS, login rate limits, the self-signed certificate,
# the usage chart.
CONSOLE = [
    "flask>=3.0,<4",
    "flask-wtf>=1.2,<2",
    "wtforms>=3.3,<4",
    "flask-babel>=4.0,<5",
    "babel>=2.12,<3",
    "argon2-cffi>=23.1,<26",
    "gunicorn>=22,<24",
    "flask-limiter>=3.5,<5",
    "cryptography>=38",
    "matplotlib>=3.6,<4",
]

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


class BuildPyWithCatalogs(build_py):
    """build_py that also compiles the console's gettext catalogs (.po -> .mo) into the build."""

    def run(self) -> None:
        from babel.messages.mofile import write_mo
        from babel.messages.pofile import read_po

        super().run()
        for po in sorted(CATALOGS.glob("*/LC_MESSAGES/*.po")):
            mo = Path(
                self.build_lib, "desanet", "gateway", "console", po.relative_to(CATALOGS.parent)
            )
            mo = mo.with_suffix(".mo")
            mo.parent.mkdir(parents=True, exist_ok=True)
            with po.open("rb") as source, mo.open("wb") as target:
                write_mo(target, read_po(source))


extensions = [
    Extension(
        "desanet.cython_ext._aggregate",
        ["cython_ext/_aggregate.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "desanet.cython_ext._copyrows",
        ["cython_ext/_copyrows.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    name="desanet",
    version=read_version(),
    description="Edge engine for village cooperative ISPs: eBPF metering, HTB shaping, billing",
    python_requires=">=3.11",
    packages=["desanet", *(f"desanet.{p}" for p in (*LAYERS, *SUBPACKAGES))],
    package_data={
        "desanet": ["py.typed"],
        "desanet.ebpf": ["*.c", "*.h"],
        "desanet.cython_ext": ["*.pyi"],
        "desanet.gateway": ["*.service", "*.toml", "*.csv"],
        "desanet.gateway.console": ["templates/*", "static/*", "translations/*/LC_MESSAGES/*"],
    },
    ext_modules=cythonize(extensions, language_level=3),
    cmdclass={"build_py": BuildPyWithCatalogs},
    install_requires=[
        "pyroute2>=0.7.12,<0.10",
        "pyzmq>=25,<28",
        "msgpack>=1.0,<2",
        "numpy>=1.24,<3",
        "prometheus_client>=0.17,<1",
        "pyrad>=2.6,<3",
        "nats-py[nkeys]>=2.6,<3",
    ],
    extras_require={
        "postgres": POSTGRES,
        "demo": DEMO,
        "console": CONSOLE,
        "dev": [
            *DEMO,
            *POSTGRES,
            *CONSOLE,
            "playwright>=1.40,<2",
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
