"""The one part of kanmon in C, kanmon/_scan.c (the DATA scans; kanmon/scan.py has them
in Python too). Optional: where no C compiler is found the install goes on without it
and kanmon runs the Python definitions (kanmon.scan.COMPILED says which). Everything
else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kanmon._scan", ["kanmon/_scan.c"], optional=True, extra_compile_args=["-O2"])])
