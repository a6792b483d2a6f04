"""Flax models and their registry."""
