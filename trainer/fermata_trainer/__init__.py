"""Fermata trainer: fine-tunes MusicGen with audiocraft inside a TrainingRun pod."""
