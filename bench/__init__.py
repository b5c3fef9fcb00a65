"""Benchmarks: commands that print figures (see `bench/ingest`), apart from the tests."""
