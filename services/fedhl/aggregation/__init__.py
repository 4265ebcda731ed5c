"""Aggregation jobs: load a round's uploads, run the job's strategy (fedhl.core), publish the
new global state and the next round's start packages, commit the round exactly once.

The coordinator's in-process runner and the `fedhl aggregator` worker call the same code.
"""
