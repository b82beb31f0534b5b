"""The unlearn-tui engine: models, data, targets, methods, metrics and the runner.

Nothing in this package imports Textual (a test enforces it).  Heavy imports
(torch, transformers) happen inside the modules that need them, never here.
"""

__all__: list[str] = []
