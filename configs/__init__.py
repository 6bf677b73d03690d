"""Model and training presets as YAML files; load them by name with ModelConfig.from_yaml."""
