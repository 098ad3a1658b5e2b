"""The commands' work, one module each, so that ``lmdistill.cli`` only parses flags and calls one job."""
