"""What the server tells about itself: Prometheus metrics, per-version statistics, logs."""
