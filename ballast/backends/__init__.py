"""Where replicas run: `local` processes today; Ray clusters and remote pools implement the same protocol."""

from ballast.backends.base import Backend, ReplicaHandle, ReplicaSpec, ReplicaStatus
from ballast.backends.local import LocalBackend

__all__ = ["Backend", "LocalBackend", "ReplicaHandle", "ReplicaSpec", "ReplicaStatus"]
