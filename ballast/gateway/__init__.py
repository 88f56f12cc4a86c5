"""The data plane: auth, limits, routing, proxying with failover, metering."""
