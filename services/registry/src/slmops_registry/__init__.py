"""slmops registry.

Artifact registry: content-addressed blobs, signed manifests, lineage, publish API.
"""
