"""The benchmark (`./dev bench`): how fast outbox_relay is, against arq's own ceiling in the same run.

Everything runs in the replicated shape on one machine: a primary and a service
database (in one embedded PostgreSQL cluster by default), Redis, the relay and
worker processes (the real CLI). Absolute numbers drift on shared machines;
the ratios within one run are what to compare.

The embedded cluster is durable by default (``fsync``, ``synchronous_commit``
on: what users run); ``--fsync-off`` shows the throw-away mode.

0. physical anchor: the commit rate of single-row outbox inserts (with the
   notify trigger) from 1 and from 4 producer connections;
1. ceiling: raw arq no-op jobs, same Redis, same worker count and settings;
2. throughput: rows committed on the primary as fast as producers can, until
   all are finished on the service database (end to end), and the ratio to 1
   and to 0;
3. latency at fixed offered loads (open loop): commit -> finished percentiles,
   at 100 events/s and at half the measured capacity;
4. backlog drain: rows committed while relay and workers are stopped, then
   drained, with batch jobs and with one row per job (JOB_BATCH_SIZE=1, the
   shape before batching); relay and worker peak RSS meanwhile;
5. table scale: sweep and hot-path query cost with 0 and with many finished
   rows (and that no hot-path plan scans the table), and the cost of pruning;
6. scaling: 1 and 2 with 1, 2 and 4 worker processes, in interleaved rounds
   (each figure the median of its rounds), with the CPU each count costs; and
   a backlog drained by each worker count (the rows committed and replicated
   first, the workers warm, the relay started last; the rate between the first
   and the last ``finished_at``), where the producers are not the limit;
7. CPU seconds per 1,000 events for relay, workers, PostgreSQL and Redis;
8. idle CPU: percent of a core a relay and each worker use with nothing to do;
9. sink routes (:mod:`bench.sinks`): rows of a routed kind committed on the primary in one
   transaction and delivered by each sink (nats, rabbitmq, webhook answering at once) to a real
   local server, then by the webhook answering after 50 ms with 1 and 2 workers: events/s from the
   commit to the last ``finished`` and the ratio to 2, messages delivered (exactly the events), the
   CPU per 1,000 events of each process, and the longest any session sat idle in a transaction.

It lives next to the package, not in it: neither the wheel nor the image carries
it. Each scenario is a module of :mod:`bench.scenarios`; :mod:`bench.run` runs
them in order, :mod:`bench.report` prints the table.
"""

from __future__ import annotations


class BenchError(Exception):
    """The benchmark could not complete a measurement."""
