"""Offline build stage: quantisation, engine builds, signed bundles."""
