"""Packages: the selection rules that pick IPC images per class from the pool, and the challenge's
submission format with its validator."""
