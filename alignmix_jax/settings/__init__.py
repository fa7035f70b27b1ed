"""The vocabulary of the settings (the modes, backbones and options a config may name:
config_choices) and the start-up check of a whole config against it (config_checks)."""
