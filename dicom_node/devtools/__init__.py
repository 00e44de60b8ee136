"""Developer tooling, never imported by the service: synthetic spine phantoms per modality, the demo
and the local OHIF viewer.  The CLI imports these lazily, only for its developer commands.
"""
