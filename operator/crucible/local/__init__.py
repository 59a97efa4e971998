"""Embedded backend: run resources as local processes with the same core."""
