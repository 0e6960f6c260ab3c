"""The base layer: what every stage stands on, importing nothing of the stages or the loop.

Modules: ``contract`` (MQTT topics, event schemas, codecs), ``config`` (typed configs from
YAML with ``section.key=value`` overrides), ``errors`` (the project's error base),
``features`` (windowing and the featuriser that turns a window into model input),
``mqtt`` (broker URLs and clients), ``broker`` (the embedded broker), ``rayinit`` (Ray
start-up), ``threads`` (torch and OpenMP threads per process), ``live`` (the live status
view), ``tracking`` (generic MLflow helpers).

The stages (``factory_sim``, ``ingest``, ``finetune``, ``serve``) import these; the
orchestrator (``flywheel.loop``, ``flywheel.campaign``, ``flywheel.report``, the CLI) imports
both.  ``tests/flywheel/test_layers.py`` fails when an import runs back up a layer.
"""
