"""How a node joins a run: the phases that build it and take it down (:mod:`phases`),
where its first parameters come from (:mod:`bootstrap`: the keeper's checkpoint or the
peers), and what its heartbeats report (:mod:`reporting`)."""
