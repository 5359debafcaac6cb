"""Deployment: batch inference over files (thresholds, inferencer and export build on it)."""
