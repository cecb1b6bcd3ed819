"""Credit for what peers did: receipts checked, spot checks run by the verifier, views.

Builds on :mod:`~crowdtrain.coordinator.records`, the store and the swarm's
progress history; the run packages and the API sit above it.
"""
