"""Delivery: sending result objects to destinations (C-STORE SCU, STOW-RS), with the result types they
share in one leaf module.  Retries and their schedule live in the job store.
"""
