"""The ``medattn`` runner, configs and benchmark scripts."""
