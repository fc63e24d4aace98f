"""Spool: a feature cache and temporal heads on frozen video foundation-model features."""

__version__ = "0.1.0"
