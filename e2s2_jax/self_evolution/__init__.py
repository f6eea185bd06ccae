"""Self-evolution masking (issue 28 part 3): score every token with a model, then mask the hard
ones (`data/informed_masking.py`) and train with rectified label smoothing."""
