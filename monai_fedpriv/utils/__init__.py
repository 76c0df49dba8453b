"""General helpers used across subpackages: crash-safe files and strict JSON (:mod:`.files`), per-owner random
state (:mod:`.rng`)."""
