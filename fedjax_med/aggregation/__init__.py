"""Server-side combination of hospital updates: FedAvg, server optimisers, secure aggregation,
compression."""
