"""The simulator's policy names, on their own so that `ballast --help` lists them without importing the
simulator (which loads the control plane)."""

NAMES = ("cheapest", "spread", "hedge", "ondemand", "default")
DEFAULT_POLICIES = ("cheapest", "spread", "hedge")
