"""Fermata operator: TrainingRun reconciliation, cost, idle, spot and gate policies."""
