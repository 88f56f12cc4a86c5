"""The replica runtime: one process serving one package over HTTP."""

from ballast.runtime.host import Host
from ballast.runtime.model import LoadState, ModelHost
from ballast.runtime.server import ReplicaApp

__all__ = ["Host", "LoadState", "ModelHost", "ReplicaApp"]
