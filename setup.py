"""Package build. The C++ CPU kernels in csrc/ are an optional extension: when no compiler is
present (or the build fails) the install still succeeds and offload uses its Numba kernels."""
from setuptools import setup

setup()
