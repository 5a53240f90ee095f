"""The one compiled part: the top-k merge's kernel (mishards/core/_topk.c).

Optional: without a C compiler the install still succeeds and the merge runs its numpy path
(mishards.core.compiled.COMPILED_KERNELS tells which one runs). Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("mishards.core._topk", ["mishards/core/_topk.c"], optional=True, extra_compile_args=["-O3"]),
    ]
)
