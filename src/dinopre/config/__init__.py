"""Settings, presets, config files, validation and the recipe that derives unset settings."""
