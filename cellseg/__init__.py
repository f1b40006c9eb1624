"""cellseg: live cell counts and confluence from microscope frames.

Subpackages live in the stage folders of the repository:
``cellseg.edge`` (``edge/``, the device), ``cellseg.build`` (``build/``),
``cellseg.training`` (``training/``). Importing this package imports none of them.
"""

__version__ = "0.1.0"
