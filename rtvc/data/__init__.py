"""Corpus synthesis, preparation and training data."""
