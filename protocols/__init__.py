"""Built-in protocol definitions (one TOML file each) and their loader."""
