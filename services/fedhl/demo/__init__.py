"""`fedhl demo`: the whole platform on one machine, on a real model and real data."""
