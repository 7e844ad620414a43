"""``kubectl fermata``: where a run stands, its report, suspend / resume, logs.

A client of the TrainingRun API (:mod:`fermata_api`), apart from the operator: it reads abort
reports from the run's storage with the trainer's storage layer when asked for one.
"""
