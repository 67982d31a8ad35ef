"""Training package: data splits, architectures, calibration, export to the model store."""
