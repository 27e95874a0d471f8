"""DC-MT experiment configs and the acceptance runner."""
