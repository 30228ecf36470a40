"""Package build. The C++ CPU kernels in csrc/ are an optional extension: when no compiler is
present (or the build fails) the install still succeeds and offload uses its Numba kernels."""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing: the C++ kernel is a speed-up, not a requirement."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler at all (DistutilsPlatformError and friends)
            self._skip("all", exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            return
        except Exception as exc:  # compile or link error
            if OPENMP not in ext.extra_compile_args:
                return self._skip(ext.name, exc)
            print(f"warning: {ext.name} did not build with OpenMP ({exc}); building it without", file=sys.stderr)
        ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
        ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(ext.name, exc)

    @staticmethod
    def _skip(name, exc):
        print(f"warning: optional C++ extension {name} not built ({exc}); offload will use its Numba kernel",
              file=sys.stderr)


# A plain C ABI library (no Python.h), loaded with ctypes by offload/kernels/cpp_kernel.py. No
# -march: the AVX-512 / AVX2 / scalar variants are all compiled in and chosen at run time.
# OpenMP where the compiler has it: the kernel's helper threads are then the OpenMP workers of the
# runtime torch loaded (libgomp.so.1 resolves to torch's copy; see csrc/paged_attention.cpp).
OPENMP = "-fopenmp"
cpu_attention = Extension(
    "offload.kernels._cpu_attention",
    sources=["csrc/paged_attention.cpp"],
    depends=["csrc/paged_attention_impl.h"],
    extra_compile_args=["-O3", "-std=c++17", "-pthread", OPENMP, "-fvisibility=hidden", "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread", OPENMP],
    language="c++",
    optional=True,
)

setup(
    ext_modules=[] if sys.platform == "win32" else [cpu_attention],
    cmdclass={"build_ext": OptionalBuildExt},
)
