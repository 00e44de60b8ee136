"""Operations: audit trail, retention, Prometheus metrics, health and readiness, ``doctor``, the web app
(jobs page, reports, ``/api/v1``) and the generated Orthanc configuration.
"""
