"""Captioning from the command line: `mqwen-caption` (or `python -m mqwen.caption`); see `cli.py`."""
