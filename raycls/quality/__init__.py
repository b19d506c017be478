"""Label quality: calibration, metrics, the review queue, comparisons and their report."""
