"""fedjax_med: federated learning with differential privacy and secure aggregation on medical
images, in JAX."""
