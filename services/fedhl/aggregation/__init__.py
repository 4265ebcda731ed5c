"""The aggregation service: a round that closes becomes `shards` aggregation tasks on the queue;
task i merges every `shards`-th module (FedHL's weights come from the round's spectra of *all*
modules, so a shard merges exactly what an unsharded task would) and leaves a partial result
in the blob store plus one `round_shards` row. Whoever records the last shard assembles the new
state and the next round's start packages and commits the round with a conditional transition
(AGGREGATING → COMMITTED): a redelivered, reclaimed or duplicated task never applies an update
twice.

- `inputs`: what a round's aggregation reads (uploads, ranks, stored state and spectra);
- `compute`: one shard's merge and its part of the next round, a pure function of the inputs;
- `shards`: shard results in the blob store, and their assembly into one state;
- `commit`: run one task, commit (or fail) the round exactly once;
- `evaluate`: the held-out evaluation a commit records (a measurement, never fails a round);
- `worker`: the queue-consuming loop and the `fedhl aggregator` process.

The coordinator's in-process worker and `fedhl aggregator` run the same loop; the coordinator
receives it from the process wiring (`fedhl.cli`), never by importing this package.
"""
