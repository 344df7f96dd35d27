"""Versioned SQL migrations, shipped inside the package so `conversations migrate` finds them."""
