"""Simulated hardware, scenarios, the fleet runner and fault injection."""
