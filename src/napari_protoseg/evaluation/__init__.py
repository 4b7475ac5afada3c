"""Scoring predictions against reference labels, and the demo's overview figure."""
