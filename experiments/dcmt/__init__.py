"""DC-MT experiment configs (run by the suite: `python -m experiments.suite --preset dcmt-acceptance`)."""
