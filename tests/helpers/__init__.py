"""Shared test helpers: process spawning, reference models, fault injection, probes."""
