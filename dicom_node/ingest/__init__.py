"""Durable ingest: a received instance is checked (header), written and synced (receive slots, spool)
before Success is answered, then recorded in the job store and the audit trail in batches (indexer).
"""
