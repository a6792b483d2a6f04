"""Local differential privacy pieces: DP-SGD, client-level DP and accounting."""
