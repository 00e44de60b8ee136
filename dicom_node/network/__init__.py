"""The DICOM network protocol: PS3.8 upper layer (PDUs, the ARTIM timer), association acceptance
(presentation contexts, AE and address access rules, TLS), DIMSE messages, and the listener that runs them.

Nothing here knows about spools, jobs or the model: an accepted C-STORE hands its bytes to a store callback
that the ingest layer provides.
"""
