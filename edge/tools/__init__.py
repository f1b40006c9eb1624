"""Commands a user runs beside the daemon: ``predict``, ``growth``, ``bench``, ``doctor`` and
``validate-config``."""
