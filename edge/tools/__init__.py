"""Commands a user runs beside the daemon: ``predict``, ``bench``, ``doctor`` and
``validate-config``."""
