"""The model shipped with cellseg, as package data (model card: ``README.md`` in this folder).

:mod:`cellseg.edge.bundles.shipped` finds it; the training checkpoint (``*.pt``) stays out of the wheel.
"""
