"""Built-in coreml-hub plugins. Each registers through an entry point in pyproject.toml, like any third-party plugin."""
