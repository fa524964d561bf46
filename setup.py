"""Build steps setuptools cannot express in pyproject.toml: the cffi extension."""

from setuptools import setup

setup(cffi_modules=["cffi_build/build_statsread.py:ffibuilder"])
