"""The S3Delta method, free of DeepSpeed: the search space, the gates, the supernet that attaches
deltas to a backbone, and the objective it trains."""
