"""Plain nn.Modules, each with a config dataclass that checkpoints store."""
