# setup.py exists only to declare the cffi extension; all metadata is in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["cext/build_cext.py:ffibuilder"])
