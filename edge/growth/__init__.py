"""From measurements to what a lab acts on: the growth phase of a culture, its doubling time
and when it will be due for passage (SciPy fits; matplotlib for the picture)."""
