"""Build the compiled core (``ingestor._core``) with Cython.

Switches, read from the environment at build time (as asyncpg and uvloop do):

``INGESTOR_DEBUG=1``
    Debug build: Cython bounds/wraparound checks on, the ``INGESTOR_DEBUG``
    C macro set (invariant checks and counters inside the core), ``-O1 -g``.
    The test suite runs against this build.
``INGESTOR_ANNOTATE=1``
    Write Cython's HTML annotation next to the sources.
``INGESTOR_SANITIZE=address,undefined``
    Compile and link with these ``-fsanitize=`` options (with the debug build).
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("INGESTOR_DEBUG", "") not in ("", "0")
ANNOTATE = os.environ.get("INGESTOR_ANNOTATE", "") not in ("", "0")
SANITIZE = os.environ.get("INGESTOR_SANITIZE", "")

extra_compile_args = ["-std=c11", "-fno-strict-aliasing", "-Wno-unused-function"]
extra_link_args = []
define_macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    extra_compile_args += ["-O1", "-g", "-UNDEBUG"]
    define_macros.append(("INGESTOR_DEBUG", "1"))
else:
    extra_compile_args += ["-O3"]
if SANITIZE:
    flag = "-fsanitize=" + SANITIZE
    extra_compile_args += [flag, "-fno-omit-frame-pointer"]
    extra_link_args += [flag]

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "freethreading_compatible": False,
}

extensions = [
    Extension(
        "ingestor._core",
        ["src/ingestor/_core.pyx"],
        include_dirs=[numpy.get_include(), "src/ingestor"],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        libraries=["z"],  # zlib's crc32: the capture format's record checksum
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=ANNOTATE,
        # Directives differ between the debug and release builds and Cython's
        # staleness check only looks at file times: always regenerate the C.
        force=True,
    ),
)
