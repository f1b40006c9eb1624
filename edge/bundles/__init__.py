"""Engines on the device's disk: signed bundles read and verified, the slot store (active,
previous), flashing with self-test and rollback, the shipped model as the first slot, and
opening the engine a slot or model file holds."""
