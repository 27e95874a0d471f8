"""Plain ``nn.Module`` networks and blocks. Nothing here imports Lightning modules or callbacks."""
