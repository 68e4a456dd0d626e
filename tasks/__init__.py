"""Few-shot tasks: regions (metadata or KMeans), region splits and episode samplers."""
