"""A model package on disk: read, validate, fingerprint, and prepare its Python environment."""

from ballast.package.environment import EnvironmentError_, ensure_environment, requirements_hash
from ballast.package.package import IGNORED_NAMES, Package, PackageError, load_package

__all__ = [
    "IGNORED_NAMES",
    "EnvironmentError_",
    "Package",
    "PackageError",
    "ensure_environment",
    "load_package",
    "requirements_hash",
]
