"""Background jobs of a node: resumable, their progress kept in the index (see pacsgrid.node)."""
