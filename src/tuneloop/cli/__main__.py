"""`python -m tuneloop.cli`."""

from tuneloop.cli import app

app()
