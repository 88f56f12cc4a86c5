"""The control plane: deployments, versions, environments, promotion and rollback, and the reconciler."""

from ballast.control.reconciler import Reconciler
from ballast.control.service import ControlError, ControlPlane, Settings, env_traffic

__all__ = ["ControlError", "ControlPlane", "Reconciler", "Settings", "env_traffic"]
