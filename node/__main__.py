"""``python -m crowdtrain.node``: the same command line as ``crowdtrain-node``."""

from crowdtrain.node.cli import main

raise SystemExit(main())
