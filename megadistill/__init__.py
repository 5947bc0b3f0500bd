"""megadistill: pre-training distillation of multilingual teachers into small Indic students."""

__version__ = "0.1.0"
