"""Shim so that legacy tools (and ``pip install -e`` on old pips) find setup.cfg."""
from setuptools import setup

setup()
