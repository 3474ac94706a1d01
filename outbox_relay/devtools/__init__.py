"""Developer tools, apart from the core: the demo, the benchmark, embedded servers, process helpers.

Imported only by the CLI's `demo`, `bench` and by the tests; they need the
``embedded`` (and, for the bench, ``bench``) extras.
"""
