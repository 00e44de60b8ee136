"""The Orthanc side of spinemed-node: a thin Python plugin that hands stable spine studies to the node.

``plugin.py`` is the script Orthanc's Python plugin loads (``"PythonScript"``); everything else here is
standard-library code it imports (settings, loop guard, durable outbox, read-only view of the node's job
store, the bridge thread).  See ``docs/orthanc.md``.
"""
