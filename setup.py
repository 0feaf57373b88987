"""Builds the C core in ext/ (Cython). Metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

EXTENSIONS = [
    Extension("ext._reqtable", ["ext/_reqtable.pyx"], extra_compile_args=["-O3"]),
]

setup(ext_modules=cythonize(EXTENSIONS, compiler_directives={"language_level": 3}))
