"""What the coordinator serves: the gRPC service for nodes, the HTTP API, the dashboard and
``/metrics``.

Handlers only translate: they parse a request, call a domain function of
:mod:`~crowdtrain.coordinator.runs`, :mod:`~crowdtrain.coordinator.ledger` or
:mod:`~crowdtrain.coordinator.swarm`, and format the answer. The top of the
coordinator's packages: nothing below imports it.
"""
