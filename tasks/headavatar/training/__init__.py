"""Shared by the training stages (5 and 6): checkpoints in object storage, small torch helpers."""
