"""The gateway: ingest, verify, store, fuse, decide, dispatch, HTTP API and dashboard."""
