"""The bench's measurements, one module each; :mod:`bench.run` runs them in order."""
