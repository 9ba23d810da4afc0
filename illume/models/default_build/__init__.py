"""Build of the embedded default model (illume-tiny): data, curriculum, export, measurement.

See docs/DEFAULT_MODEL.md. ``python -m illume.models.default_build --out DIR --work BUILD_DIR``.
"""
