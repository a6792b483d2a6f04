"""Server-side combination of hospital updates: FedAvg, robust aggregators (median, trimmed mean),
server optimisers, secure aggregation, compression."""
