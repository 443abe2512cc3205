"""Builds the compiled hot path, gridgate._fastparse, from src/_fastparse.pyx.

Release builds use -O3 and leave Cython's bounds/wraparound checks off; the
code in the .pyx/.pxi files checks every index it uses against the buffer
length itself, so these checks would only be redundant work on the hot path.
GRIDGATE_DEBUG_BUILD=1 turns the checks and C asserts back on.
"""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("GRIDGATE_DEBUG_BUILD") == "1"

extensions = [
    Extension(
        "gridgate._fastparse",
        ["src/_fastparse.pyx"],
        extra_compile_args=["-O0", "-g"] if debug else ["-O3"],
        define_macros=[] if debug else [("NDEBUG", "1")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["src"],
        compiler_directives={
            "language_level": 3,
            "boundscheck": debug,
            "wraparound": debug,
            "initializedcheck": debug,
            "cdivision": True,
            "embedsignature": True,
        },
        annotate=False,
    ),
)
