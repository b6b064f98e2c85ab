"""Readers and writers: mosaics, labels, the region store."""
