"""What the trainer and the server share: the manifest schema, image preprocessing, exported tensor names.

The only part of `service` that `training` imports.
"""
