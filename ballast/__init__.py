"""Ballast: a self-hostable production inference platform."""

__version__ = "0.1.0"
