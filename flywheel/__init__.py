"""Industrial deployment data flywheel: the wire contract, shared config, the turn loop and the CLI."""

__version__ = "0.1.0"
