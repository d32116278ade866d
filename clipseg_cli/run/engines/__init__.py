"""Distributed engines that schedule :mod:`clipseg_cli.items` on other runtimes (Ray Data)."""
