"""Industrial deployment data flywheel: the orchestrator (turn loop, campaign, report, CLI) on top,
and in ``flywheel.base`` the base layer every stage stands on (wire contract, config, MQTT, ...)."""

__version__ = "0.1.0"
