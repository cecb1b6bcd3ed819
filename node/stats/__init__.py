"""What a node counts and shows: tokens and losses (:mod:`accounting`), bytes by purpose
(:mod:`traffic`), where the training loop's time goes (:mod:`loop_time`), and the status
line and progress bars (:mod:`progress`). Imports nothing else of the node, so every part
of it may count here."""
