"""SIFT two-stage retrieval, library layer: RootSIFT features, a k-means vocabulary, BoVW/VLAD
encodings for the first (global, FAISS) stage and geometric verification for the re-ranking stage.
Served through the plugins in extractors.py (registered by imagesearch.plugins.sift_plugin)."""
