"""Readers turn a dataset on disk into a :class:`datamodules.manifest.Manifest`."""
