"""Shared low-level pieces: rotary attention helpers, quantizers, uncached file reads."""
