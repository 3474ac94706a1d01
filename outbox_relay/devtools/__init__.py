"""Developer tools, apart from the core: the demo, embedded servers, the shared set-up, process helpers.

Imported only by the CLI's `demo`, by the benchmark (``bench/`` next to the
package, `./dev bench`) and by the tests; they need the ``embedded`` extra
(the benchmark also the ``bench`` extra).
"""
