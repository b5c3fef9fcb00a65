"""Errors an operator can act on. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations


class BluelightError(Exception):
    """Base of every error the CLI reports as `Error: <message>`."""


class ConfigError(BluelightError):
    """Settings that are missing, malformed or unsafe."""
