"""Plugins defined by the tests, as a package published by someone else would define them."""
