"""Backends run a plan's stages somewhere: ``local`` (submitit's LocalExecutor) for now."""
