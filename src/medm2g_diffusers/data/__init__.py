"""Data: virtual patients (phantoms), medical file I/O, and datasets in the canonical layout."""
