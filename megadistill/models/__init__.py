"""Teacher loading, student construction and vocabulary trimming."""
