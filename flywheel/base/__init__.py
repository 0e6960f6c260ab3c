"""The base layer: what every stage stands on, importing nothing of the stages or the loop.

Modules: ``contract`` (MQTT topics, event schemas, codecs), ``config`` (typed configs from
YAML with ``section.key=value`` overrides), ``errors`` (the project's error base),
``features`` (windowing and the featurisers that turn a window into model input),
``snapshot`` (reading dataset snapshots from a local or object-store lake), ``workdir``
(every place under ``--workdir``), ``mqtt`` (broker URLs and clients), ``broker`` (the
embedded broker), ``rayinit`` (joining or starting Ray), ``threads`` (torch and OpenMP
threads per process), ``timing`` (wall time per stage), ``live`` (the live status view),
``tracking`` (generic MLflow helpers), ``usage`` (no usage reports to library vendors).

The stages (``factory_sim``, ``ingest``, ``finetune``, ``serve``) import these; the
orchestrator (``flywheel.loop`` and its ``record``, ``stack``, ``holdout`` and ``state``
modules, ``flywheel.campaign``, ``flywheel.report``, the CLI) imports both.  ``tests/flywheel/test_layers.py`` fails when an import runs back up a layer.
"""
