"""The capacity simulator (`ballast simulate`): Ballast's own autoscaler, placement and failover decision in
virtual time, against simulated pools and a request trace (`engine.Simulation`)."""
