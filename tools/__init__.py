"""Command-line tools (binarize, ...) runnable as scripts; a package so tests can import them."""
