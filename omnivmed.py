"""Lets scripts and tests import the flat remote-code files as one package: `from omnivmed.modeling_omnivmed import ...`.

The Hub copies `configuration_omnivmed.py`, `modeling_omnivmed.py`, ... into a package of its own and they import each
other as `from .x import y`. A module that defines `__path__` is a package to Python's import system, so this file
gives a checkout the same layout without installing anything.
"""

import os


__path__ = [os.path.dirname(os.path.abspath(__file__))]
