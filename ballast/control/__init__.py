"""The control plane: deployments, versions, environments, promotion and rollback, and the reconciler.

service (operations on desired state) -> planner (pure: promotions, canaries, desired counts) and
health (pure: replica state machine, backoff) -> reconciler (the loop; store_io writes decisions back)
-> actuator (backend calls, outside transactions). views and snapshot are the read side.
"""

from ballast.control.reconciler import Reconciler
from ballast.control.service import ControlError, ControlPlane, Settings, env_traffic

__all__ = ["ControlError", "ControlPlane", "Reconciler", "Settings", "env_traffic"]
