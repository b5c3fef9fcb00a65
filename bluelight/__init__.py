"""Bluelight command line and one-box orchestration."""
