"""Only the optional C extensions; everything else is in pyproject.toml.

`optional=True`: where no compiler is at hand the install still succeeds and
netfilter falls back to its pure-Python paths (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[
    Extension("netfilter._fastpath", ["src/netfilter/_fastpath.c"],
              extra_compile_args=["-O3"], optional=True),
    Extension("netfilter.dns._hotpath", ["src/netfilter/dns/_hotpath.c"],
              extra_compile_args=["-O3"], optional=True),
])
