"""The replica runtime: one process serving one package over HTTP."""

from ballast.runtime.model import LoadState, ModelHost
from ballast.runtime.server import ReplicaApp

__all__ = ["LoadState", "ModelHost", "ReplicaApp"]
