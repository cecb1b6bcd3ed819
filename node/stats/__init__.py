"""What a node counts and shows: tokens and losses (:mod:`accounting`), bytes by purpose
(:mod:`traffic`), and the status line and progress bars (:mod:`progress`). Imports
nothing else of the node, so every part of it may count here."""
