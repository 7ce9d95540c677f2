"""The real-data experiments: image data sets, the MLPs, first-layer pruning and the sweep."""
