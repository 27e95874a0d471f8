"""Reusable data code: readers, splits, transforms, DataModules. Nothing here imports ``lightning_modules``
or ``callbacks``, so other projects can use it on its own."""
