"""Raster and vector I/O: dataset readers, the tile index, windowed prediction and GIS writers."""
