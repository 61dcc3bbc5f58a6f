"""Continual learning over a stream of permuted-digits tasks with GEM and A-GEM."""
