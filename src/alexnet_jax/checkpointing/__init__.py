"""A run on disk: the Orbax manager (checkpoint), its manifest and storage checks, the workdir lock, the
run info, and loading a trained run (trained).
"""
