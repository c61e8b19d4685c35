"""What a finished run is turned into: deltas folded into the backbone (merge) and exported models."""
