"""Build hook for the optional CUDA C++ twins in csrc/.

A plain `pip install -e .` is a pure-Python install on every machine: nothing is compiled here, because
build isolation hides torch and nvcc exists on CPU-only machines too. The CUDA library is built on request
(see csrc/README.md); until then this file only defers to pyproject.toml.
"""
from setuptools import setup

setup()
