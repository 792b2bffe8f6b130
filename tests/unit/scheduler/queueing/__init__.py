"""Unit and property tests of the admission engine and its configuration (no I/O)."""
