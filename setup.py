"""Builds the C core in ext/ (Cython). Metadata lives in pyproject.toml.

`ext._frames` compiles against the installed pyzmq's Cython declarations and needs
zmq.h (apt libzmq3-dev, installed by `make sysdeps`). Without either (pip's isolated
build has no pyzmq) it is skipped with a message and `ext` uses its pure-Python twin;
`make install` builds it in place afterwards, against the venv's own pyzmq.
"""

import os
import sys
import sysconfig

from Cython.Build import cythonize
from setuptools import Extension, setup

HEADER_DIRS = ["/usr/include", "/usr/local/include", sysconfig.get_paths()["include"]]
HAVE_ZMQ_H = any(os.path.exists(os.path.join(d, "zmq.h")) for d in HEADER_DIRS)
try:
    import zmq

    ZMQ_INCLUDES = zmq.get_includes()
    PYZMQ_VERSION = zmq.__version__
except ImportError:
    ZMQ_INCLUDES, PYZMQ_VERSION = [], ""

EXTENSIONS = [
    Extension("ext._reqtable", ["ext/_reqtable.pyx"], extra_compile_args=["-O3"]),
    Extension("ext._codec", ["ext/_codec.pyx"], extra_compile_args=["-O3"]),
    Extension("ext._pages", ["ext/_pages.pyx"], extra_compile_args=["-O3"]),
    Extension(
        "ext._actiontable",
        ["ext/_actiontable.pyx"],
        depends=["ext/_actiontable.pxd", "ext/_atomics.h"],
        extra_compile_args=["-O3"],
    ),
]
if HAVE_ZMQ_H and ZMQ_INCLUDES:
    EXTENSIONS.append(
        Extension(
            "ext._frames",
            ["ext/_frames.pyx"],
            include_dirs=ZMQ_INCLUDES,
            define_macros=[("MTSERVE_PYZMQ_VERSION", f'"{PYZMQ_VERSION}"')],
            libraries=["dl"],
            extra_compile_args=["-O3"],
        )
    )
else:
    why = "zmq.h not found (apt install libzmq3-dev)" if ZMQ_INCLUDES else "no pyzmq here"
    print(f"setup.py: ext._frames is skipped: {why}", file=sys.stderr)

setup(
    ext_modules=cythonize(
        EXTENSIONS, compiler_directives={"language_level": 3}, include_path=ZMQ_INCLUDES
    )
)
