"""Feature extraction (the paper's recipe) and the HDF5 feature cache."""
