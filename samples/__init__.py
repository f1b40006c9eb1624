"""Sample frames shipped with cellseg, as package data (source and licence: ``SOURCE.md``).

:mod:`cellseg.edge.bundles.shipped` finds them; ``cellseg demo`` runs on them.
"""
