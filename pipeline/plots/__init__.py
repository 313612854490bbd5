"""Matplotlib figures; every function returns a Figure and leaves saving to the caller."""
