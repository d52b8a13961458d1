"""The command line: `textdiffusion COMMAND` (main.py dispatches; one module per subcommand that has flags)."""

from textdiffusion.cli.main import main

__all__ = ["main"]
