"""One module per CLI command. Each defines `register(app)`, which adds its command(s) to the Typer app.

Command bodies stay thin: parse options, call one job, render the result through zsclip.output.
Imports of torch and PIL happen inside the command functions so `zsclip --help` stays instant.
"""
