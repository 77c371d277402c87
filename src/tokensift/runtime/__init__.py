"""Runtime plumbing shared by every method: attention function, cache, score slices, decode loop."""
