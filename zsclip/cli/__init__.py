"""The terminal layer: the Typer app (app.py), one module per command, and private helpers (_*.py)."""

from zsclip.cli.app import app, main, run

__all__ = ["app", "main", "run"]
