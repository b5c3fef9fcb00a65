"""Bluelight's PKI tooling: CAs, issuing, enrolment by CSR, revocation, TLS contexts.

This package holds code only; generated key material lives in a directory the caller
names (git-ignored), never in the repository.
"""
