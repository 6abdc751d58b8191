"""Builds the C++ fused RSD sampler (csrc/) as rsd_engine._C; everything else is in pyproject.toml."""
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

# Portable flags only (no -march=native): csrc/rsd_sample.cpp builds its own AVX2 / AVX-512 variants
# with target pragmas and picks one at import. -Wno-psabi silences GCC's notes about wide vector types in
# the portable build (internal functions only, so no ABI is involved).
ext = Pybind11Extension(
    "rsd_engine._C",
    sources=["csrc/rsd_sample.cpp"],
    depends=sorted(glob("csrc/*.h")),
    cxx_std=17,
    extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"],
    extra_link_args=["-fopenmp"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
