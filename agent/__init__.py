"""The Pumice agent: the dispatcher that runs LAVA-format jobs on boards."""

__version__ = "0.1.0"
