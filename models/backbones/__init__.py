"""Backbones written with the official checkpoint key names."""
