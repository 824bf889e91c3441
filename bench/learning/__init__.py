"""The learning benchmark: `python -m bench.learning --help`."""
