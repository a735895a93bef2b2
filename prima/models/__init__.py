"""Learnable parts of Prima, one architecture per file."""
