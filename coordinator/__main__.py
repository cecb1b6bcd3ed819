"""``python -m crowdtrain.coordinator``: the same command line as ``crowdtrain-coordinator``."""

from crowdtrain.coordinator.cli import main

raise SystemExit(main())
