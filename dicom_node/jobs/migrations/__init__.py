"""Alembic migrations of the job store's schema (both dialects); applied at start by :mod:`dicom_node.jobs.schema`."""
